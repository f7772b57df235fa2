"""Names of records and entries in fedsim's messages, in one place.

Server and client code on different machines agree on these strings; keeping them
here means a typo is an ``AttributeError`` at import time, not a silent ``KeyError``
in round 37 on a remote node. Hyphenated names follow Flower's own convention
(``"num-examples"``, ``"server-round"``), so Flower's strategies read our replies.
"""

from typing import Final

# RecordDict entries of a message.
ARRAYS: Final = "arrays"
CONFIG: Final = "config"
METRICS: Final = "metrics"

# ConfigRecord entries sent by the server.
SERVER_ROUND: Final = "server-round"
SEED: Final = "seed"
LR: Final = "lr"
LOCAL_EPOCHS: Final = "local-epochs"
BATCH_SIZE: Final = "batch-size"

# MetricRecord entries sent back by clients.
NUM_EXAMPLES: Final = "num-examples"
TRAIN_LOSS: Final = "train_loss"
LOSS: Final = "loss"
ACCURACY: Final = "accuracy"

# node_config entries, as Flower's simulation runtime and `flower-supernode
# --node-config` set them.
PARTITION_ID: Final = "partition-id"
NUM_PARTITIONS: Final = "num-partitions"

# Context.state entries a client keeps across rounds.
CLIENT_STATE: Final = "fedsim.client"
ROUNDS_PARTICIPATED: Final = "rounds-participated"
