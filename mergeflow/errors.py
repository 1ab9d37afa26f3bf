"""Exception types. `InputError` means bad input (never retried); `TransientStorageError` may be retried."""

from __future__ import annotations


class MergeflowError(Exception):
    """Base class of every error Mergeflow raises on purpose."""


class InputError(MergeflowError):
    """The input is wrong (file, tensor, config field); retrying cannot help."""


class CheckpointError(InputError):
    """A checkpoint file or one of its tensors is missing, unreadable, truncated or inconsistent."""

    def __init__(self, file: str, message: str, tensor: str | None = None):
        self.file = file
        self.tensor = tensor
        where = f"{file}" + (f", tensor {tensor!r}" if tensor else "")
        super().__init__(f"{where}: {message}")


class UnsafeCheckpointError(CheckpointError):
    """A pickle that holds Python objects, refused unless converted explicitly with `mergeflow convert`."""


class IntegrityError(InputError):
    """Content does not match its recorded sha256 digest or size."""


class ConfigError(InputError):
    """An unknown method, an unknown parameter or an invalid value."""


class OverflowInMergeError(ConfigError):
    """Finite inputs merged into values the output dtype cannot hold (coefficients too large for them)."""


class StorageAccessError(InputError):
    """The store refused access (wrong credentials or permissions)."""


class ObjectNotFoundError(InputError):
    """A bucket or object that should exist does not."""


class ObjectExistsError(InputError):
    """Publishing would silently replace a different existing object."""


class TransientStorageError(MergeflowError):
    """A network or storage failure that may succeed on retry."""
