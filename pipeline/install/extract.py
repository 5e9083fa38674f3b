"""Extract a bundle into the offline project directory: the transaction around the bundle
reader. Verified first, safe, atomic, idempotent.

:func:`extract_bundle` is the ``extract`` stage of ``doit install``. In order:

1. **Up to date?** The stamp (``.infer-vllm/extract.sha256``) and the record
   (``extract.json``) say which bundle was extracted last, with the tar's ``(size, mtime_ns,
   inode, device)`` at that time and every extracted file's ``(size, mtime_ns, inode,
   ctime_ns)`` (ctime: a file rewritten in place with its size and mtime put back differs). When
   the tar, the expected sha256 and the files all still match, nothing is read: a reboot with a
   multi-GB bundle costs a few ``stat`` calls, never a re-hash (doit's own ``file_dep`` check
   would re-hash the tar with md5 on a fresh doit database or a touched file). A replaced or
   touched tar is hashed again; a damaged extraction is extracted again.
2. **Read-only checks, before anything is written**, by the bundle reader
   (:mod:`pipeline.bundle.reader`): pixi-pack's other two outputs are refused, the tar's
   headers are parsed, ONE sequential pass over the file computes the bundle's sha256 and every
   member's, and every member must pass the safety rules (names outside the bundle layout are
   skipped). The bundle's sha256 must equal ``AUTO_INFER_VLLM_BUNDLE_SHA256``, else the one in
   ``<tar>.sha256`` beside it (when neither exists the sha256 is recorded, with a warning).
   ``pixi-pack.json`` must say version ``1`` and this host's platform, and the extras must hold
   together (:mod:`pipeline.bundle.metadata`).
3. **Staging**: members are copied (:class:`~pipeline.fsutil.RangeCopier`: ``copy_file_range``,
   else ``sendfile``, from the verified tar, no second hash)
   into ``.infer-vllm/staging-*`` inside the project dir, with ``pixi.toml`` and ``pixi.lock``
   taken from the bundle's extras (``infer-vllm-bundle.json``), else from the ``vllm-pixi/``
   template when its lock matches the bundle's channel, else generated from the channel's
   ``repodata.json`` for bundles written by pixi-pack itself (what pixi-unpack installs: every
   package of the channel, plus every wheel of ``pypi/``). The lock is then checked against the
   channel (:mod:`pipeline.bundle.contents`): the environment is in it, its packages are
   exactly the channel's, every package file has the lock's sha256 (a swapped archive is
   refused), and no member lies where packages go (``channel/<subdir>/``, ``pypi/``) without
   being a locked package file (an unlocked wheel is refused, not quietly left there).
4. **Switch**: the stamps are removed, the previous bundle's names are moved aside (kept, with
   their records, as the rollback point ``.infer-vllm/previous/`` when the environment runs
   from them, else deleted) and the staged ones renamed into place, the record and then the
   stamp are written. A crash before the stamp leaves no stamp, so the next run extracts
   again; the installed environment (``.pixi/envs``) is never touched by this stage. The
   later stages run under :func:`previous_extraction_guard`: when they fail before the new
   environment is switched in, the rollback point is put back, so the project's pixi.toml,
   pixi.lock and channel describe the environment that runs (what ``launcher = "pixi"``
   runs through); once switched in, it is deleted.

Every problem raises :class:`~pipeline.errors.BundleError` with one line: what, which file or
member, what to do. Serialized with the other stages by the project's install lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from pipeline import __version__, reporting
from pipeline.bundle import reader
from pipeline.bundle.contents import (
    LOCK_NAME,
    MANIFEST_NAME,
    check_lock_against_channel,
    check_package_members,
    read_repodata,
    synthesize_project,
)
from pipeline.bundle.delta import is_delta, read_manifest
from pipeline.bundle.format import (
    BUNDLE_NAMES,
    CHANNEL_DIR,
    ENVIRONMENT_FILE,
    EXTRAS_FILE,
    INDEX_FILE,
    METADATA_FILE,
    REPODATA_FILE,
    SIG_FILE,
    checksum_path,
)
from pipeline.bundle.index import check_digests, check_listing, read_index
from pipeline.bundle.metadata import BundleExtras, check_extras, check_metadata
from pipeline.bundle.parts import BundleSource, is_parts_file, read_parts_file
from pipeline.bundle.signature import check_signed, signature_path
from pipeline.errors import BundleError
from pipeline.fsutil import (
    CHUNK,
    fsync_dir,
    os_error_advice,
    os_error_text,
    os_errors_as,
)
from pipeline.install.base import open_delta_over_base
from pipeline.install.layout import (
    BundleStat,
    ExtractRecord,
    FileFacts,
    PatchStamp,
    ProjectPaths,
    install_lock,
    read_extract_record,
    read_extract_stamp,
    read_install_record,
    read_patch_stamp,
    write_extract_record,
    write_extract_stamp,
)
from pipeline.pixi.envs import host_platform
from pipeline.pixi.lockfile import LockedEnvironment
from pipeline.timing import PhaseClock

# What an extraction owns in the project dir (replaced as a whole by the next one).
MANAGED_NAMES = (*BUNDLE_NAMES, MANIFEST_NAME, LOCK_NAME)

Source = Literal["extras", "template", "channel"]


# ---- the result ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractResult:
    """What :func:`extract_bundle` did (``extracted`` False: it was up to date)."""

    bundle: Path
    sha256: str
    extracted: bool
    reason: str
    source: str = ""
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    warnings: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        if not self.extracted:
            return f"{self.bundle.name} ({self.sha256[:12]}) already extracted: {self.reason}"
        return (
            f"extracted {self.bundle.name} ({self.sha256[:12]}, {self.files} files, "
            f"{self.bytes / 1e6:.1f} MB) in {self.seconds:.1f} s; pixi.toml/pixi.lock from "
            f"{self.source}"
        )


# ---- the stage ------------------------------------------------------------------------------


def extract_is_current(
    bundle: Path, project_dir: Path, *, environment: str, configured_sha256: str | None
) -> bool:
    """True when the last extraction is of this bundle (same tar stat, same expected sha256,
    same environment) and every extracted file is unchanged. Reads metadata only (a few
    ``stat`` calls); never raises. The doit ``uptodate`` check of ``extract``."""
    try:
        expected = _expected(bundle, configured_sha256)
        return _stale_reason(ProjectPaths.of(project_dir), bundle, expected, environment) is None
    except (OSError, BundleError):
        return False


def extract_bundle(
    bundle: Path,
    project_dir: Path,
    *,
    environment: str,
    configured_sha256: str | None = None,
    template_dir: Path | None = None,
    host: str | None = None,
    say: Callable[[str], None] | None = None,
    clock: PhaseClock | None = None,
    trusted_signers: Path | None = None,
    base_bundle: Path | None = None,
) -> ExtractResult:
    """Extract ``bundle`` into ``project_dir`` (see the module docstring for every step).

    ``bundle`` may be a delta (:mod:`pipeline.bundle.delta`): the full bundle it describes is
    read, pieced from the delta and its base: ``base_bundle`` (a tar or parts file), else the
    project dir's installed extraction, which must be the delta's base.

    Idempotent: the same bundle again returns at once (``extracted`` False) without reading
    the tar. Blocks on the project's install lock, then for one read of the tar and one copy of
    its members. ``template_dir`` is the ``vllm-pixi/`` project used for bundles without
    extras; ``host`` replaces this host's platform (tests). Each step's wall and CPU time goes
    into ``clock`` (bundle hash, member checks, extract, lock check, commit). Raises BundleError;
    on any failure
    the project dir keeps its previous extraction (or none) and ``.pixi/envs`` is untouched.
    """
    say = say or reporting.say
    clock = clock or PhaseClock()
    bundle = Path(bundle).absolute()
    paths = ProjectPaths.of(project_dir)
    host = host or host_platform()
    started = time.monotonic()
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        say(f"warning: {message}")

    with (
        install_lock(paths, say=say),
        os_errors_as(BundleError, f"cannot extract {bundle} into {paths.root}"),
    ):
        try:
            st = bundle.stat()
        except OSError as exc:
            raise BundleError(
                f"no bundle at {bundle} ({exc.strerror}); set AUTO_INFER_VLLM_BUNDLE_PATH to the "
                "bundle tar or its .parts.json"
            ) from None
        if not is_parts_file(bundle):
            reader.refuse_other_layouts(bundle, st)
        expected = _expected(bundle, configured_sha256)
        reason = _stale_reason(paths, bundle, expected, environment)
        if reason is None:
            digest = read_extract_stamp(paths) or ""
            return ExtractResult(bundle, digest, extracted=False, reason="nothing changed")
        clock.begin()
        if is_delta(bundle):
            assert expected is not None  # the sha256 of the bundle the delta rebuilds
            if _same_content(paths, expected, environment):
                _refresh_bundle_stat(paths, bundle, st)
                return ExtractResult(
                    bundle, expected, extracted=False, reason="same content (tar stat refreshed)"
                )
            source, expected_from = open_delta_over_base(
                bundle, paths, configured_sha256, base_bundle, warn
            )
        else:
            source, expected_from = reader.open_bundle(bundle, configured_sha256)
        if expected is None:
            warn(
                f"no expected sha256 for {bundle} (set AUTO_INFER_VLLM_BUNDLE_SHA256 or put "
                f"{checksum_path(bundle).name} beside it): its integrity is not checked"
            )

        with source:
            scan_error: BundleError | None = None
            members: list[reader.BundleMember] = []
            try:
                members = reader.scan_members(source)
            except BundleError as exc:
                scan_error = exc
            say(f"checking {bundle.name} ({source.size / 1e6:.1f} MB)")
            digests, member_sha = reader.hash_pass(source, members)
            digest = source.check_digests(digests, member_sha) or digests[0]
            clock.lap("bundle hash")
            if scan_error is not None:
                raise scan_error
            if _same_content(paths, digest, environment):
                _refresh_bundle_stat(paths, bundle, st)
                return ExtractResult(
                    bundle, digest, extracted=False, reason="same content (tar stat refreshed)"
                )
            kept, skipped = reader.check_members(members, bundle)
            if skipped:
                warn(
                    f"bundle {bundle} has {len(skipped)} members outside "
                    f"{', '.join(BUNDLE_NAMES)} (first: {skipped[0]}); they are not extracted"
                )
            by_name = {m.name: m for m in kept}
            signer = check_signed(
                _read(source, by_name, INDEX_FILE, bundle) if INDEX_FILE in by_name else None,
                _read(source, by_name, SIG_FILE, bundle) if SIG_FILE in by_name else None,
                signature_path(source.tar_path),
                f"bundle {bundle}",
                trusted_signers,
            )
            if signer is None:
                warn(
                    f"{bundle.name} was not checked for a signature "
                    "(AUTO_INFER_VLLM_TRUSTED_SIGNERS is not set)"
                )
            else:
                say(f"{bundle.name}: signed by {signer} ({trusted_signers})")
            if INDEX_FILE in by_name:
                _check_index(source, kept, skipped, member_sha, bundle)
            if METADATA_FILE not in by_name:
                raise BundleError(
                    f"bundle {bundle} has no {METADATA_FILE}: it is not a pixi-pack bundle"
                )
            metadata = check_metadata(
                reader.read_member(source, by_name[METADATA_FILE], bundle), bundle, host
            )
            extras = (
                check_extras(
                    reader.read_member(source, by_name[EXTRAS_FILE], bundle), bundle, metadata
                )
                if EXTRAS_FILE in by_name
                else None
            )
            env_yml = (
                reader.read_member(source, by_name[ENVIRONMENT_FILE], bundle).decode(
                    "utf-8", "replace"
                )
                if ENVIRONMENT_FILE in by_name
                else None
            )
            file_members = {m.name: m for m in kept if m.kind in ("file", "hardlink")}
            # A hard link's offset is its original's (reader.check_members): same bytes, same hash.
            sha_of = {name: member_sha[m.offset] for name, m in file_members.items()}

            staging = paths.state / f"staging-{uuid.uuid4().hex[:12]}"
            _remove_leftovers(paths)
            clock.lap("member checks")
            try:
                staging.mkdir(parents=True)
                say(f"extracting {len(kept)} members into {paths.root}")
                _extract_members(source, kept, staging, bundle)
                clock.lap("extract")
                source = _project_files(
                    staging,
                    paths,
                    environment=environment,
                    platform=(extras.lock_platform if extras else None) or metadata.platform,
                    extras=extras,
                    template_dir=template_dir,
                    env_yml=env_yml,
                    sha_of=sha_of,
                    names=[m.name for m in kept],
                    warn=warn,
                )
                lock_sha = hashlib.sha256((staging / LOCK_NAME).read_bytes()).hexdigest()
                clock.lap("lock check")
                _commit(paths, staging, environment)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        files: dict[str, FileFacts] = {}
        total = 0
        for name in sorted(sha_of):
            fst = (paths.root / name).stat()
            files[name] = FileFacts.of(fst, sha_of[name])
            total += fst.st_size
        write_extract_record(
            paths,
            ExtractRecord(
                bundle=BundleStat.of(bundle, st),
                sha256=digest,
                expected_from=expected_from,
                environment=environment,
                # The lock platform the stages after this one select (by name, else subdir).
                platform=(extras.lock_platform if extras else None) or metadata.platform,
                pixi_pack_version=metadata.pixi_pack_version,
                source=source,
                lock_sha256=lock_sha,
                skipped_sdists=tuple(extras.skipped_sdists) if extras else (),
                tool_version=__version__,
                extracted_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                files=files,
            ),
        )
        write_extract_stamp(paths, digest)
        fsync_dir(paths.state)
        clock.lap("extract commit")
        return ExtractResult(
            bundle,
            digest,
            extracted=True,
            reason=reason,
            source=source,
            files=len(files),
            bytes=total,
            seconds=time.monotonic() - started,
            warnings=tuple(warnings),
        )


# ---- internals ------------------------------------------------------------------------------


def _files_intact(paths: ProjectPaths, record: ExtractRecord) -> bool:
    for name, facts in record.files.items():
        try:
            st = (paths.root / name).lstat()
        except OSError:
            return False
        if not facts.matches(st):
            return False
    return paths.manifest.is_file() and paths.lock.is_file()


def _check_index(
    source: BundleSource,
    kept: list[reader.BundleMember],
    skipped: list[str],
    member_sha: Mapping[int, str],
    bundle: Path,
) -> None:
    """A bundle that carries an index (every bundle this project writes) must hold exactly
    the files it lists, with their sizes and sha256 (:mod:`pipeline.bundle.index`)."""
    by_name = {m.name: m for m in kept}
    index = read_index(_read(source, by_name, INDEX_FILE, bundle), bundle)
    if index.kind != "env":
        raise BundleError(
            f"bundle {bundle} is a {index.kind} bundle ({index.name}), not an environment "
            "bundle; install it with `doit install-model` (AUTO_INFER_VLLM_MODEL_BUNDLES)"
        )
    if skipped:
        raise BundleError(
            f"bundle {bundle} holds {skipped[0]!r}, which its {INDEX_FILE} does not list: the "
            "bundle was changed after it was packed; refusing it"
        )
    files = {
        m.name: m
        for m in kept
        if m.kind in ("file", "hardlink") and m.name not in (INDEX_FILE, SIG_FILE)
    }
    links = [m.name for m in kept if m.kind == "symlink"]
    if links:
        raise BundleError(
            f"bundle {bundle} holds the link {links[0]!r}, which its {INDEX_FILE} does not "
            "list: the bundle was changed after it was packed; refusing it"
        )
    check_listing(
        index,
        {name: m.size for name, m in files.items()},
        [m.name for m in kept if m.kind == "dir"],
        bundle,
    )
    check_digests(index, {name: member_sha[m.offset] for name, m in files.items()}, bundle)


def _read(
    source: BundleSource, by_name: Mapping[str, reader.BundleMember], name: str, bundle: Path
) -> bytes:
    return reader.read_member(source, by_name[name], bundle)


def _expected(bundle: Path, configured: str | None) -> str | None:
    """The sha256 the bundle must have, without reading it: the configured one, the
    ``.sha256`` beside a tar, the whole bundle's in a parts file, or the one a delta
    rebuilds."""
    if is_parts_file(bundle):
        return read_parts_file(bundle).sha256
    if is_delta(bundle):
        return read_manifest(bundle).target.sha256
    return reader.expected_sha256(bundle, configured)[0]


def _stale_reason(
    paths: ProjectPaths, bundle: Path, expected: str | None, environment: str
) -> str | None:
    """Why the extraction must run again, or None when it is current. Metadata only."""
    record = read_extract_record(paths)
    if record is None:
        return "nothing extracted yet"
    if record.bundle != BundleStat.of(bundle, bundle.stat()):
        return "the bundle file changed"
    if expected is not None and record.sha256 != expected:
        return "a different bundle is expected"
    if record.environment != environment:
        return f"environment changed to '{environment}'"
    if not _files_intact(paths, record):
        return "extracted files were changed or removed"
    return None


def _same_content(paths: ProjectPaths, digest: str, environment: str) -> bool:
    record = read_extract_record(paths)
    return (
        record is not None
        and record.sha256 == digest
        and record.environment == environment
        and _files_intact(paths, record)
    )


def _refresh_bundle_stat(paths: ProjectPaths, bundle: Path, st: os.stat_result) -> None:
    record = read_extract_record(paths)
    if record is not None:
        write_extract_record(paths, replace(record, bundle=BundleStat.of(bundle, st)))


def _extract_members(
    source: BundleSource,
    members: Iterable[reader.BundleMember],
    staging: Path,
    bundle: Path,
) -> None:
    """Write the members under ``staging``: directories, files copied from the tar's bytes,
    links as checked by :func:`pipeline.bundle.reader.check_members`."""
    target = staging
    try:
        for member in members:
            target = staging / member.name
            if member.kind == "dir":
                target.mkdir(mode=0o755, parents=True, exist_ok=True)
                continue
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if member.kind == "symlink":
                target.symlink_to(member.target)
                continue
            mode = 0o755 if member.mode & 0o111 else 0o644
            out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            try:
                source.copy_to(out, member.offset, member.size)
            finally:
                os.close(out)
            target.chmod(mode)
    except OSError as exc:
        raise BundleError(
            f"cannot extract {bundle} into {staging.parent.parent} "
            f"({os_error_text(exc, target)}); {os_error_advice(exc)}"
        ) from None
    source.check_unchanged()


def _project_files(
    staging: Path,
    paths: ProjectPaths,
    *,
    environment: str,
    platform: str,
    extras: BundleExtras | None,
    template_dir: Path | None,
    env_yml: str | None,
    sha_of: Mapping[str, str],
    names: Iterable[str],
    warn: Callable[[str], None],
) -> Source:
    """Put ``pixi.toml`` and ``pixi.lock`` into ``staging`` and check the lock against the
    staged channel and the bundle's member ``names`` (no package file it does not list);
    return where they came from."""
    repodata = read_repodata(staging / CHANNEL_DIR)
    names = list(names)

    def check(label: str, skipped: Iterable[str] = ()) -> LockedEnvironment:
        locked = check_lock_against_channel(
            staging / LOCK_NAME,
            environment,
            platform,
            repodata,
            sha_of.get,
            lock_label=label,
            skipped_sdists=skipped,
            file_md5=lambda rel: _md5(staging / rel),
        )
        check_package_members(names, locked, lock_label=label)
        return locked

    if extras is not None:
        (staging / MANIFEST_NAME).write_text(extras.pixi_toml, encoding="utf-8")
        (staging / LOCK_NAME).write_text(extras.pixi_lock, encoding="utf-8")
        check(f"the bundle's pixi.lock ({EXTRAS_FILE})", extras.skipped_sdists)
        return "extras"

    if template_dir is not None:
        t_manifest, t_lock = template_dir / MANIFEST_NAME, template_dir / LOCK_NAME
        if t_manifest.is_file() and t_lock.is_file():
            shutil.copyfile(t_manifest, staging / MANIFEST_NAME)
            shutil.copyfile(t_lock, staging / LOCK_NAME)
            try:
                check(f"the template lock {t_lock}")
                return "template"
            except BundleError as exc:
                warn(
                    f"the bundle has no {EXTRAS_FILE} and the template {t_lock} does not "
                    f"describe it ({exc.message}); installing the bundle's channel as "
                    "pixi-unpack does"
                )
    synthesize_project(staging, paths.channel, paths.pypi, environment, platform, repodata, env_yml)
    check(f"the lock generated from {CHANNEL_DIR}/*/{REPODATA_FILE}")
    return "channel"


def _md5(path: Path) -> str | None:
    try:
        digest = hashlib.md5()
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()
    except OSError:
        return None


def _remove_leftovers(paths: ProjectPaths) -> None:
    """Staging and trash dirs of an install that crashed (we hold the lock: nobody uses them)."""
    if paths.state.is_dir():
        for entry in paths.state.iterdir():
            if entry.name.startswith(("staging-", "trash-")) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)


def _commit(paths: ProjectPaths, staging: Path, environment: str) -> None:
    """Replace the project's managed names with the staged ones. The stamps go first, so a
    crash in between leaves a project that the next run extracts again.

    The names replaced become the rollback point (:func:`_keep_as_previous`) when the
    environment runs from them; else they are deleted. A rollback point already there for
    the running environment (an install refused or killed since) is kept as it is."""
    keep = _keep_as_previous(paths, environment)
    aside = paths.state / f"trash-{uuid.uuid4().hex[:12]}"
    aside.mkdir()
    try:
        if keep:
            # The records that describe the names moved aside, copied before the stamps go.
            saved = ProjectPaths.of(aside).state
            saved.mkdir()
            for record in (paths.extract_record, paths.extract_stamp, paths.patch_stamp):
                shutil.copy2(record, saved / record.name)
        for stamp in (paths.extract_stamp, paths.patch_stamp):
            stamp.unlink(missing_ok=True)
        fsync_dir(paths.state)
        for name in MANAGED_NAMES:
            current = paths.root / name
            if os.path.lexists(current):
                current.rename(aside / name)
        if keep:
            aside.rename(paths.previous)  # one rename: a rollback point is whole or absent
        for name in MANAGED_NAMES:
            staged = staging / name
            if os.path.lexists(staged):
                staged.rename(paths.root / name)
        fsync_dir(paths.root)
    except OSError as exc:
        raise BundleError(
            f"cannot move the extracted bundle into {paths.root} ({exc.strerror}); fix the "
            "permissions there and run the install again"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(aside, ignore_errors=True)


# ---- the rollback point ---------------------------------------------------------------------
#
# `extract` replaces pixi.toml, pixi.lock, channel/ ... at once, but the environment built from
# them is switched in only by `frozen-install`, after its checks and the verify. Until then,
# and for good when that install is refused, the project would describe an environment that
# does not run, and `launcher = "pixi"` (`pixi run` there) would "update" the running
# environment in place to match it. So the names an environment runs from are kept in
# `.infer-vllm/previous/` (laid out as a project dir: the names, and `.infer-vllm/` with their
# extract.json, extract.sha256 and patch.stamp) while a new extraction is being installed: put
# back when that install fails, deleted once it is switched in. A first install has none: a
# refused one leaves its (complete) extraction, which describes no running environment.


def _runs_from(paths: ProjectPaths, where: ProjectPaths, environment: str) -> bool:
    """True when ``environment``'s current generation was installed from the extraction that
    ``where`` records (same bundle and lock sha256), patched. Small reads; never raises."""
    record = read_extract_record(where)
    installed = read_install_record(paths.installed_from(environment))
    return (
        record is not None
        and installed is not None
        and record.environment == environment == installed.environment
        and (installed.bundle_sha256, installed.lock_sha256) == (record.sha256, record.lock_sha256)
        and read_patch_stamp(where) == PatchStamp(record.sha256, str(paths.root), environment)
    )


def _keep_as_previous(paths: ProjectPaths, environment: str) -> bool:
    """Whether the names about to be replaced must become the rollback point: they are what
    ``environment`` runs from and no rollback point for it exists. A stale one (of another
    environment or generation, or half made) is removed here."""
    if paths.previous.exists():
        if _runs_from(paths, ProjectPaths.of(paths.previous), environment):
            return False
        shutil.rmtree(paths.previous, ignore_errors=True)
    return _runs_from(paths, paths, environment)


def _restore_previous(paths: ProjectPaths, environment: str, *, say: Callable[[str], None]) -> bool:
    """Put the rollback point back (see above): the project's managed names and records
    become again those ``environment`` runs from (:func:`previous_extraction_guard` calls it
    when an install of a newer extraction failed before its switch). Returns False (and removes a
    stale one) when there is none for the running environment. Never raises: a failure is
    said as a warning (the install's own error is the one to report); the stamps are gone by
    then, so the next install extracts again."""
    previous = ProjectPaths.of(paths.previous)
    record = read_extract_record(previous)
    if record is None or not _runs_from(paths, previous, environment):
        shutil.rmtree(paths.previous, ignore_errors=True)
        return False
    aside = paths.state / f"trash-{uuid.uuid4().hex[:12]}"
    try:
        for stamp in (paths.extract_stamp, paths.patch_stamp):
            stamp.unlink(missing_ok=True)
        fsync_dir(paths.state)
        aside.mkdir()
        for name in MANAGED_NAMES:
            if os.path.lexists(paths.root / name):
                (paths.root / name).rename(aside / name)
        for name in MANAGED_NAMES:
            if os.path.lexists(previous.root / name):
                (previous.root / name).rename(paths.root / name)
        fsync_dir(paths.root)
        previous.patch_stamp.replace(paths.patch_stamp)
        # Renaming a file moves its ctime: the top-level files went aside and back by our
        # hands, under the install lock, so their new ctime is taken (nothing else differs).
        write_extract_record(paths, _moved_back(paths, record))
        previous.extract_stamp.replace(paths.extract_stamp)  # last: now it is current
        fsync_dir(paths.state)
    except OSError as exc:
        say(
            f"warning: could not put back the project files of the running environment from "
            f"{paths.previous} ({os_error_text(exc, paths.previous)}); the next `doit install` "
            "extracts its bundle again"
        )
        return False
    finally:
        # Half put back, it must not serve as a rollback point again: the next extraction
        # starts from no stamp, whatever is left.
        shutil.rmtree(aside, ignore_errors=True)
        shutil.rmtree(paths.previous, ignore_errors=True)
    say(
        f"put back pixi.toml, pixi.lock and {CHANNEL_DIR}/ of the environment that runs "
        f"({record.bundle.path}, {record.sha256[:12]})"
    )
    return True


def _moved_back(paths: ProjectPaths, record: ExtractRecord) -> ExtractRecord:
    files = dict(record.files)
    for name, facts in record.files.items():
        if "/" in name:
            continue  # below a directory that was renamed: the file's own inode is untouched
        with contextlib.suppress(OSError):
            st = (paths.root / name).lstat()
            if (st.st_size, st.st_mtime_ns, st.st_ino) == (facts.size, facts.mtime_ns, facts.ino):
                files[name] = FileFacts.of(st, facts.sha256)
    return replace(record, files=files)


@contextlib.contextmanager
def previous_extraction_guard(
    paths: ProjectPaths, environment: str, *, say: Callable[[str], None]
) -> Iterator[None]:
    """Wrap a stage that works on the project's extraction (patch-channels, frozen-install),
    under the install lock. When the block ends and ``environment`` runs from that extraction
    (switched in, or current already), the rollback point is deleted. When the block raises
    (a refusal, an interruption) and the environment still runs from the rollback point, it
    is put back: pixi.toml, pixi.lock and the channel describe again what runs. The decision
    is taken from the records, so an error after the switch deletes it too."""
    try:
        yield
    except BaseException:
        if _runs_from(paths, paths, environment):
            shutil.rmtree(paths.previous, ignore_errors=True)
        else:
            _restore_previous(paths, environment, say=say)
        raise
    if _runs_from(paths, paths, environment):
        shutil.rmtree(paths.previous, ignore_errors=True)


__all__ = [
    "ExtractResult",
    "extract_bundle",
    "extract_is_current",
    "previous_extraction_guard",
]
