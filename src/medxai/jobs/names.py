"""What batch jobs call their inputs in every output, and how file names that are identifiers stay out of them.

Clinical folders often name files after patients (``Doe_John_1970-01-01.dcm``). :class:`InputNames` gives each input
one display name, used in every CSV, JSON line, console table, skipped list and output file name: the path as given,
or, with ``hash_names``, a pseudonym of 20 hex digits made from the path relative to the folder it was found in.
The pseudonym is a SHA-256 of that relative path, keyed (HMAC) with ``MEDXAI_HASH_KEY`` when it is set: without a
key, anyone who can guess a file name can recompute its pseudonym, so set one when file names are patient names.

:meth:`InputNames.redacted_logs` also rewrites log records while a job runs, so that a library warning quoting a
path cannot carry the real name past the pseudonyms.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from medxai.data.readers import is_hidden_or_system, special_file_reason
from medxai.run_folder import safe_file_stem

__all__ = ["InputFile", "InputNames", "HASH_KEY_ENV"]

logger = logging.getLogger(__name__)

#: Environment variable holding a secret that keys the pseudonyms of ``--hash-names``.
HASH_KEY_ENV = "MEDXAI_HASH_KEY"
_MIN_REDACTED_LENGTH = 5  # shorter names ("1.png") are left alone in logs, not to mangle unrelated text


@dataclass(frozen=True)
class InputFile:
    """One input file of a batch job.

    Attributes:
        path: where it is read from.
        name: what every output calls it (the path as given, or its pseudonym).
        stem: the base of its output files' names (unique within the job).
    """

    path: Path
    name: str
    stem: str


class InputNames:
    """Expands files and folders into :class:`InputFile` objects and names them.

    Args:
        items: files and folders as the user gave them; folders are expanded recursively (sorted; links to folders
            are listed as skipped, not followed; hidden files such as ``.DS_Store`` and system files such as
            ``Thumbs.db`` are listed as skipped, not read; hidden and system folders such as ``.git`` and
            ``__MACOSX`` are left out, and how many is logged once).
        hash_names: name inputs by pseudonyms instead of their paths.
    """

    def __init__(self, items: Sequence[str | Path], *, hash_names: bool = False) -> None:
        self.hash_names = hash_names
        self.files: list[InputFile] = []
        self.skipped: list[tuple[str, str]] = []  # (name, reason): entries that are not files to read
        self._real: dict[str, str] = {}  # real spelling -> name, for redaction
        self._key = os.environ.get(HASH_KEY_ENV, "").encode()
        stems: set[str] = set()
        left_out: list[Path] = []  # hidden and system folders
        for item in items:
            for path, relative in _expand(Path(item), left_out):
                reason = _hidden_reason(path) or special_file_reason(path)
                name = self._name(path, relative)
                if reason is not None:
                    self.skipped.append((name, reason))
                    continue
                stem = _unique(name if hash_names else _stem_of(relative), stems)
                self.files.append(InputFile(path, name, stem))
        if left_out:  # counted, not named: a folder name can be an identifier too
            logger.info("left out %d hidden or system folder(s) (such as .git or __MACOSX) and what they hold",
                        len(left_out))

    @property
    def naming(self) -> dict[str, str]:
        """How inputs are named, as batch jobs record it beside their results: by their paths, or by pseudonyms
        with a fingerprint of the key (an HMAC of a fixed text: it tells keys apart and reveals nothing of them)."""
        if not self.hash_names:
            return {"names": "paths"}
        fingerprint = hmac.new(self._key, b"medxai pseudonym key fingerprint", hashlib.sha256).hexdigest()[:16]
        return {"names": "pseudonyms", "key_fingerprint": fingerprint}

    def __len__(self) -> int:
        """Every entry found: files to read and entries skipped while listing."""
        return len(self.files) + len(self.skipped)

    def redact(self, text: str) -> str:
        """``text`` with every real spelling of an input's path or file name replaced by its name."""
        if not self.hash_names:
            return text
        for real in sorted(self._real, key=len, reverse=True):
            if real in text:
                text = text.replace(real, self._real[real])
        return text

    @contextlib.contextmanager
    def redacted_logs(self) -> Iterator[None]:
        """While active, every log record reaching any handler installed now (the root's, the application's, a
        test's) is redacted (see :meth:`redact`)."""
        if not self.hash_names:
            yield
            return
        redactor = _RedactingFilter(self)
        loggers = [logging.getLogger(), *(item for item in logging.Logger.manager.loggerDict.values()
                                          if isinstance(item, logging.Logger))]
        handlers = list({id(handler): handler for item in loggers for handler in item.handlers}.values())
        for handler in handlers:
            handler.addFilter(redactor)
        try:
            yield
        finally:
            for handler in handlers:
                handler.removeFilter(redactor)

    def _name(self, path: Path, relative: Path) -> str:
        if not self.hash_names:
            return str(path)
        digest = hmac.new(self._key, relative.as_posix().encode(), hashlib.sha256).hexdigest()
        name = digest[:20]
        for real in (str(path), os.path.abspath(path), relative.as_posix(), path.name, path.stem):
            if len(real) >= _MIN_REDACTED_LENGTH:
                self._real[real] = name
        return name


class _RedactingFilter(logging.Filter):
    def __init__(self, names: InputNames) -> None:
        super().__init__()
        self.names = names

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.names.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        if record.exc_info:
            record.exc_text = self.names.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def _hidden_reason(path: Path) -> str | None:
    """Why a hidden or system file is not read (it is listed as skipped), or None."""
    if not is_hidden_or_system(path):
        return None
    return "hidden file" if path.name.startswith(".") else "system file"


def _expand(path: Path, left_out: list[Path]) -> Iterator[tuple[Path, Path]]:
    """``(path, path relative to the folder it was found in)`` for a file, or for every file under a folder; hidden
    and system folders under it are appended to ``left_out`` instead."""
    if not path.is_dir():  # a file, or whatever else was named: special_file_reason judges it
        yield path, Path(path.name)
        return
    for folder, subfolders, files in os.walk(path):
        subfolders.sort()
        for name in list(subfolders):
            child = Path(folder, name)
            if is_hidden_or_system(name):
                subfolders.remove(name)  # an OS's or a tool's folder (.git, __MACOSX): not an input
                left_out.append(child)
            elif child.is_symlink():
                yield child, child.relative_to(path)  # listed as skipped: links to folders are not followed
        for name in sorted(files):
            child = Path(folder, name)
            yield child, child.relative_to(path)


def _stem_of(relative: Path) -> str:
    """Output file stem from a relative path: folders joined by ``__``, the extension kept (``a/b.png`` ->
    ``a__b_png``), so inputs of different folders or types never share a name."""
    text = "__".join(relative.with_suffix("").parts) + (relative.suffix.replace(".", "_") if relative.suffix else "")
    return safe_file_stem(text, limit=200) or "input"


def _unique(stem: str, taken: set[str]) -> str:
    candidate, number = stem, 2
    while candidate in taken:
        candidate, number = f"{stem}_{number}", number + 1
    taken.add(candidate)
    return candidate
