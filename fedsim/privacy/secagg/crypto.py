"""Cryptographic primitives of secure aggregation: key agreement, PRG, secret sharing.

Key pairs (SECP384R1), key agreement (ECDH + HKDF-SHA256), authenticated
encryption (Fernet) and Shamir secret sharing (over GF(2^128), via PyCryptodome)
are Flower's own SecAgg+ primitives, reused as they are: they are functions on
bytes, independent of Flower's legacy server workflow. Two of Flower's SecAgg+
helpers are deliberately *not* reused:

* ``pseudo_rand_gen`` folds its seed into 32 bits for ``np.random.RandomState``,
  so a server could find a mask by trying all 2^32 seeds; masks here are AES-256
  in counter mode keyed by the full 256-bit seed;
* ``quantize`` rounds with NumPy's global RNG; see :mod:`.quantization`.

Secrets (key pairs, self-mask seeds) come from the operating system's CSPRNG, not
from fedsim's seeded generators: a server that knows the run's seed must not be
able to derive them. Masks cancel exactly, so this does not make results depend
on anything but the seed.
"""

import base64
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

SEED_BYTES = 32


def new_key_pair() -> tuple[bytes, bytes]:
    """Return a fresh ``(private, public)`` key pair, PEM-serialized."""
    private, public = generate_key_pairs()
    return private_key_to_bytes(private), public_key_to_bytes(public)


def new_seed() -> bytes:
    """Return a fresh 256-bit self-mask seed b_u."""
    return os.urandom(SEED_BYTES)


def agree(private_key: bytes, public_key: bytes) -> bytes:
    """Return the 32-byte key shared by the owners of ``private_key`` and ``public_key``.

    ``agree(sk_u, pk_v) == agree(sk_v, pk_u)``: this is how two clients get the
    same pairwise mask, and how the server rebuilds a dropped client's masks.
    """
    key = generate_shared_key(bytes_to_private_key(private_key), bytes_to_public_key(public_key))
    return base64.urlsafe_b64decode(key)


def prg(seed: bytes, size: int) -> np.ndarray:
    """Return ``size`` pseudorandom uint32 values, uniform on Z_{2^32}, from a 32-byte seed.

    AES-256-CTR of zeros: a fresh key per seed, so a fixed zero nonce is safe.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a PRG seed has {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(4 * size)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def share(secret: bytes, threshold: int, num_shares: int) -> list[bytes]:
    """Split ``secret`` into ``num_shares`` Shamir shares, any ``threshold`` of which rebuild it."""
    return create_shares(secret, threshold, num_shares)


def reconstruct(shares: list[bytes], threshold: int) -> bytes:
    """Rebuild a secret from at least ``threshold`` of its shares (each carries its index).

    Fewer shares would interpolate a wrong secret without notice: refuse them.
    """
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares of a secret, {threshold} needed")
    return combine_shares(shares)


def seal(key: bytes, source: int, destination: int, b_share: bytes, s_share: bytes) -> bytes:
    """Encrypt a pair of shares from ``source`` to ``destination`` with their agreed key.

    The node ids are inside the ciphertext, so a server that forwards it to the
    wrong node, or claims another source, is caught by :func:`open_sealed`.
    """
    plaintext = share_keys_plaintext_concat(source, destination, b_share, s_share)
    return encrypt(base64.urlsafe_b64encode(key), plaintext)


def open_sealed(
    key: bytes, ciphertext: bytes, *, source: int, destination: int
) -> tuple[bytes, bytes]:
    """Decrypt what :func:`seal` produced; return ``(b_share, s_share)``."""
    plaintext = decrypt(base64.urlsafe_b64encode(key), ciphertext)
    sealed_source, sealed_destination, b_share, s_share = share_keys_plaintext_separate(plaintext)
    if (sealed_source, sealed_destination) != (source, destination):
        raise ValueError(
            f"shares sealed from {sealed_source} to {sealed_destination} "
            f"arrived as from {source} to {destination}"
        )
    return b_share, s_share
