"""Secure aggregation: the server learns only the sum of masked, quantized updates.

Pairwise additive masking with dropout recovery (Bonawitz et al. 2017,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS,
https://eprint.iacr.org/2017/281):

* :mod:`.quantization`: an update as integers mod 2^32, with its error bound;
* :mod:`.crypto`: key agreement, the mask PRG, Shamir shares, share encryption;
* :mod:`.masking`: adding masks (client) and removing them from the sum (server);
* :mod:`.wire`: the protocol's message types and record entries, and typed reads.

The protocol runs as four exchanges between
:class:`fedsim.strategies.secure_aggregation.SecureAggregation` and the handlers of
:mod:`fedsim.clients.secagg_mod`. Relative to the paper, the server is assumed
honest-but-curious: there are no signatures on public keys and no consistency
check round (the paper's round 3), so an active server could lie about who
dropped out; clients do refuse to reveal shares of both secrets of one client.
"""
