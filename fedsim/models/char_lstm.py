"""A 2-layer character LSTM for next-character prediction (McMahan et al., AISTATS 2017).

The FedAvg paper's Shakespeare model "takes a series of characters as input and embeds
each of these into a learned 8 dimensional space. The embedded characters are then
processed through 2 LSTM layers, each with 256 nodes. Finally the output of the second
LSTM layer is sent to a softmax output layer with one node per character", unrolled
over 80 characters. As in LEAF's version of the task (Caldas et al. 2018, arXiv
1812.01097) a sample is a window of characters and its target is the one character
that follows it, so the task is a classification over the vocabulary, measured by
accuracy and perplexity (``fedsim.data.text`` builds such windows).
"""

from torch import Tensor, nn


class CharLSTM(nn.Module):
    """Embedding, a stacked LSTM, and a linear layer from the last step to the next character."""

    def __init__(self, vocab_size: int, *, embedding_dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        """Map ``(batch, length)`` character ids to ``(batch, vocab)`` next-character logits."""
        embedded = self.embedding(tokens.long())  # (B, L) -> (B, L, E)
        outputs, _ = self.lstm(embedded)  # (B, L, hidden)
        return self.head(outputs[:, -1])  # the state after the last character


def char_lstm(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden: int = 256,
    embedding_dim: int = 8,
    layers: int = 2,
) -> nn.Module:
    """Build the paper's model: ``input_shape`` is ``(window,)``, ``num_classes`` the vocabulary."""
    if len(input_shape) != 1:
        raise ValueError(
            f"model 'char-lstm' needs windows of character ids, input shape (length,); "
            f"got {input_shape}"
        )
    return CharLSTM(num_classes, embedding_dim=embedding_dim, hidden=hidden, layers=layers)
