r"""Self and pairwise masks (Bonawitz et al. 2017, §4): added by clients, removed from the sum.

Client u, with self-mask seed b_u and mask key pair (s_sk_u, s_pk_u), sends

    y_u = x_u + PRG(b_u) + Σ_{v ∈ U2, v ≠ u} sign(u, v) · PRG(s_uv)    (mod 2^32)

where U2 are the clients that shared their keys, s_uv = KA(s_sk_u, s_pk_v) = s_vu,
and sign(u, v) = +1 if u > v else -1. The pairwise masks of any two clients that
both sent y cancel in Σ y. The self mask is what protects a client the server
wrongly believes dropped: the server gets shares of b_u *or* of s_sk_u, never
both. To unmask the sum over survivors U3, the server removes PRG(b_u) for every
u ∈ U3 and, for every v ∈ U2 \ U3, the masks sign(u, v)·PRG(s_uv) that the
survivors added for v, from s_sk_v rebuilt from shares.

All arithmetic is on uint32 arrays, whose additions wrap mod 2^32.
"""

from collections.abc import Iterable, Mapping

import numpy as np

from fedsim.privacy.secagg.crypto import agree, prg


def mask(
    encoded: np.ndarray,
    *,
    node: int,
    self_seed: bytes,
    mask_key: bytes,
    peer_keys: Mapping[int, bytes],
) -> np.ndarray:
    """Return client ``node``'s masked input y from its encoded input x (uint32).

    ``mask_key`` is the node's private mask key s_sk; ``peer_keys`` maps every
    other client of U2 to its public mask key s_pk.
    """
    masked = encoded.astype(np.uint32) + prg(self_seed, encoded.size)
    for peer, public_key in peer_keys.items():
        _add_pairwise(masked, agree(mask_key, public_key), positive=node > peer)
    return masked


def unmask(
    total: np.ndarray,
    *,
    self_seeds: Iterable[bytes],
    dropped_keys: Mapping[int, bytes],
    survivor_keys: Mapping[int, bytes],
) -> np.ndarray:
    """Return Σ x over survivors from Σ y over survivors.

    ``self_seeds`` are the survivors' rebuilt b_u; ``dropped_keys`` maps each
    dropped client of U2 to its rebuilt private mask key s_sk_v;
    ``survivor_keys`` maps each survivor to its public mask key s_pk_u.
    """
    result = total.astype(np.uint32)  # a copy: the caller's sum stays as it was
    for seed in self_seeds:
        result -= prg(seed, result.size)
    for dropped, private_key in dropped_keys.items():
        for survivor, public_key in survivor_keys.items():
            # The survivor added sign(survivor, dropped)·PRG(s); take it away.
            _add_pairwise(result, agree(private_key, public_key), positive=survivor < dropped)
    return result


def _add_pairwise(vector: np.ndarray, key: bytes, *, positive: bool) -> None:
    """Add (or subtract) PRG(key) to ``vector`` in place, mod 2^32."""
    pairwise = prg(key, vector.size)
    if positive:
        vector += pairwise
    else:
        vector -= pairwise
