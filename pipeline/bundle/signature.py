"""Signed bundles: the index signed with an SSH key on the build host, checked against an
OpenSSH ``allowed_signers`` file in the container, with the host's own ``ssh-keygen``.

What is signed is the bundle's index (:mod:`pipeline.bundle.index`): it lists every other
member with its sha256, so a valid signature over it, plus every member matching it, proves
the whole content came from the key's owner. (A parts file is signed too, beside it.)

- Build host: ``PIPELINE_SIGNING_KEY`` (an SSH private key: Ed25519, or any type
  ``ssh-keygen -Y sign`` takes; with no passphrase, or its public key with the private one in
  ``ssh-agent``) -> ``ssh-keygen -Y sign -n infer-vllm-bundle``. The signature goes into the
  bundle as ``infer-vllm-index.sig`` and beside it as ``<bundle>.sig``.
- Container: ``AUTO_INFER_VLLM_TRUSTED_SIGNERS`` (``allowed_signers``) ->
  ``ssh-keygen -Y find-principals`` (who signed) then ``ssh-keygen -Y verify`` (that it is
  this index), before a single member is extracted. The signature is taken from inside the
  bundle, else from ``<bundle>.sig``.

Verification runs the host's ``ssh-keygen``, never code from the bundle. Each refusal is one
line naming the signer or its absence (:class:`~pipeline.errors.BundleError`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pipeline.errors import BundleError, PipelineError

NAMESPACE = "infer-vllm-bundle"
SIG_SUFFIX = ".sig"


def signature_path(bundle: Path) -> Path:
    """``<bundle>.sig`` (also ``<bundle>.parts.json.sig`` for a parts file)."""
    return bundle.with_name(bundle.name + SIG_SUFFIX)


def _ssh_keygen() -> str:
    found = shutil.which("ssh-keygen")
    if found is None:
        raise BundleError(
            "ssh-keygen is not on PATH: bundle signatures need OpenSSH (apt-get install "
            "openssh-client)"
        )
    return found


def sign(data: bytes, key: Path) -> bytes:
    """An SSH signature (``-----BEGIN SSH SIGNATURE-----``) of ``data`` with ``key``, in the
    namespace ``infer-vllm-bundle``. Raises BundleError naming the key and what to do."""
    if not key.is_file():
        raise BundleError(
            f"PIPELINE_SIGNING_KEY={key} is not a file; make a key with `ssh-keygen -t ed25519 "
            f"-f {key}` (see docs/signing.md)"
        )
    from pipeline.procs import query  # here: it loads asyncio, and most readers never sign

    with tempfile.TemporaryDirectory(prefix="sign-") as tmp:
        message = Path(tmp) / "index"
        message.write_bytes(data)
        try:
            query(
                [_ssh_keygen(), "-Y", "sign", "-q", "-f", str(key), "-n", NAMESPACE, str(message)],
                label=f"ssh-keygen -Y sign with {key}",
                error=BundleError,
            )
        except BundleError as exc:
            raise BundleError(
                f"{exc.message}; PIPELINE_SIGNING_KEY must be a private key without a "
                "passphrase, or the public key of one loaded in ssh-agent"
            ) from None
        return (Path(tmp) / "index.sig").read_bytes()


def verify(data: bytes, signature: bytes, allowed_signers: Path, what: str) -> str:
    """Check ``signature`` over ``data`` against ``allowed_signers``; returns the signer
    (the principal of the ``allowed_signers`` line that matched). Raises BundleError: a key
    not in the file, a signature that is not over ``data``, a malformed signature."""
    if not allowed_signers.is_file():
        raise BundleError(
            f"AUTO_INFER_VLLM_TRUSTED_SIGNERS={allowed_signers} is not a file; write an "
            "allowed_signers file there (see docs/signing.md)"
        )
    from pipeline.procs import query

    keygen = _ssh_keygen()
    with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
        message = Path(tmp) / "index"
        sig = Path(tmp) / "index.sig"
        message.write_bytes(data)
        sig.write_bytes(signature)
        try:
            found = query(
                [keygen, "-Y", "find-principals", "-s", str(sig), "-f", str(allowed_signers)],
                label="ssh-keygen -Y find-principals",
                error=PipelineError,
            )
        except PipelineError:
            raise BundleError(
                f"{what} is signed by a key that {allowed_signers} "
                "(AUTO_INFER_VLLM_TRUSTED_SIGNERS) does not list, or its signature is "
                "damaged: refusing it; add the builder's key to that file if you trust it"
            ) from None
        principal = found.split()[0] if found.split() else ""
        try:
            query(
                [keygen, "-Y", "verify", "-f", str(allowed_signers), "-I", principal,
                 "-n", NAMESPACE, "-s", str(sig)],
                label="ssh-keygen -Y verify",
                error=PipelineError,
                stdin=message,
            )  # fmt: skip
        except PipelineError:
            raise BundleError(
                f"{what}: the signature by {principal} is not a signature of this bundle's "
                "index (a signature from another bundle, or the index was changed): refusing "
                "it; copy the bundle and its signature again"
            ) from None
        return principal


def check_signed(
    index: bytes | None,
    inside: bytes | None,
    beside: Path,
    what: str,
    allowed_signers: Path | None,
) -> str | None:
    """The signer of a bundle whose index is ``index`` (None: the bundle has none), signed
    by ``inside`` (its ``infer-vllm-index.sig``) or else by the file ``beside``; None when
    ``allowed_signers`` is None (nothing to check against). Raises BundleError when a
    signature is required and missing or not valid (:func:`verify`)."""
    if allowed_signers is None:
        return None
    signature = inside
    if signature is None:
        try:
            signature = beside.read_bytes()
        except OSError:
            signature = None
    if index is None or signature is None:
        raise not_signed(what, allowed_signers)
    return verify(index, signature, allowed_signers, what)


def write_signature(bundle: Path, signature: bytes | None) -> None:
    """``<bundle>.sig`` beside the bundle; an old one is removed when ``signature`` is None
    (a bundle packed again unsigned must not keep a signature of its predecessor)."""
    from pipeline.fsutil import atomic_write_bytes

    if signature is None:
        signature_path(bundle).unlink(missing_ok=True)
    else:
        atomic_write_bytes(signature_path(bundle), signature)


def not_signed(what: str, allowed_signers: Path) -> BundleError:
    return BundleError(
        f"{what} is not signed (no infer-vllm-index.sig inside, no .sig beside it), and "
        f"AUTO_INFER_VLLM_TRUSTED_SIGNERS={allowed_signers} requires a signature: refusing it; "
        "pack it with PIPELINE_SIGNING_KEY set"
    )


__all__ = [
    "NAMESPACE",
    "check_signed",
    "not_signed",
    "sign",
    "signature_path",
    "verify",
    "write_signature",
]
