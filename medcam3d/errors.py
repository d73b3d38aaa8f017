"""Error types of medcam3d: one root, :class:`Medcam3dError`, and one map to CLI exit codes.

Every error subclasses both the root and a builtin, so callers can catch the usual exception
(``ValueError``, ``IndexError``, ``FileNotFoundError`` ...) or everything medcam3d raises at once
(``except Medcam3dError``). Each message says what was wrong, what was expected and how to fix it.

Exit codes of the ``medcam3d`` command (see :func:`exit_code`): 0 success; 1 a failure while
running (a case of a cohort that failed, an internal error); 2 a usage error (bad arguments, an
invalid config, an input that cannot be used, a refusal such as an untrusted model); 130 Ctrl-C;
143 SIGTERM (handled as Ctrl-C is: see :class:`Terminated`). :func:`one_line` makes any message
one line for the command's single error line; :func:`cause_line` names an error's root cause on one
line and :func:`short_repr` gives a bounded repr of a value, for messages that quote them.
"""

from __future__ import annotations

import re
import reprlib

#: The errors of reading and writing images, which :mod:`medcam3d.io` exports as well.
_IMAGE_ERRORS = (
    "ImageReadError",
    "ImageNotFoundError",
    "UnsupportedFormatError",
    "VolumeError",
    "VolumeIndexError",
    "NonFiniteError",
    "GeometryError",
    "ImageTooLargeError",
    "UntrustedFileError",
    "ImageWriteError",
    "UnwritableImageError",
    "OutputPermissionError",
    "OutputDirectoryError",
)

__all__ = [
    "Medcam3dError",
    "UsageError",
    "ConfigError",
    "UntrustedError",
    "UntrustedModelError",
    "UntrustedConfigError",
    "UntrustedNetworkError",
    "UntrustedTransformError",
    "ModelLoadError",
    "MethodNotFoundError",
    "LayerNotFoundError",
    "LayerError",
    "TargetError",
    "TargetIndexError",
    "ModelOutputError",
    "InputError",
    "ModelForwardError",
    "ExplainerMemoryError",
    "InferenceModeError",
    "MethodBudgetError",
    "ConcurrentUseError",
    "SpaceError",
    "PreprocessingError",
    *_IMAGE_ERRORS,
    "CohortError",
    "CaseIdError",
    "OutputConflictError",
    "ShearWarning",
    "ChannelGridWarning",
    "ProbabilityOutputWarning",
    "PlacementWarning",
    "ConcurrentUseWarning",
    "Terminated",
    "exit_code",
    "one_line",
    "cause_line",
    "short_repr",
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended


class Medcam3dError(Exception):
    """Root of every error medcam3d raises on purpose. ``exit_code`` is the CLI's exit status."""

    exit_code: int = EXIT_USAGE


class _PlainMessage:
    """Mixin for KeyError subclasses: print the message, not its repr."""

    def __str__(self) -> str:
        args = getattr(self, "args", ())
        return str(args[0]) if args else ""


# ----------------------------------------------------------------------------- usage and config
class UsageError(Medcam3dError, ValueError):
    """Bad command-line arguments or API arguments."""


class ConfigError(Medcam3dError, ValueError):
    """A configuration file that is missing, unreadable or invalid."""


class UntrustedError(Medcam3dError, PermissionError):
    """Doing this would execute code (or read files) that the user did not trust (``--trust``)."""


class UntrustedModelError(UntrustedError):
    """Loading would execute code from a file, and trust was not given."""


class ModelLoadError(Medcam3dError, ValueError):
    """A model that cannot be built, or weights that do not fit it."""


class UntrustedConfigError(UntrustedError):
    """A config names something that may run code (a class, a transform, an argument) and trust was not given."""


class UntrustedNetworkError(UntrustedConfigError, UntrustedModelError):
    """``model.network`` or ``model.args`` outside what a config may name without ``--trust``."""


# ----------------------------------------------------------------------------- engine
class MethodNotFoundError(_PlainMessage, Medcam3dError, KeyError, ValueError):
    """An explainer name that is not registered."""


class LayerNotFoundError(_PlainMessage, Medcam3dError, KeyError, ValueError):
    """A target layer name or module that is not part of the model."""


class LayerError(Medcam3dError, ValueError):
    """A target layer that exists but cannot be explained (not spatial, not used, ...)."""


class TargetError(Medcam3dError, ValueError):
    """A target (class, classes, region) that does not fit the model's output."""


class TargetIndexError(TargetError, IndexError):
    """A class index outside the model's output range."""


class ModelOutputError(TargetError):
    """A model output that holds no logits tensor (an unsupported type, or a dict without ``"logits"``)."""


class InputError(Medcam3dError, ValueError):
    """An input tensor with the wrong shape, dtype or non-finite values."""


class ModelForwardError(InputError, RuntimeError):
    """The model's forward pass failed on the (preprocessed) input: a size, channel count, dtype or device
    it does not take. Also a ``RuntimeError``, as the model's own error was; the message holds its reason."""


class MethodBudgetError(Medcam3dError, ValueError):
    """A perturbation method (occlusion, Score-CAM) that would run more forward passes than its budget."""


class ExplainerMemoryError(Medcam3dError, MemoryError):
    """Out of (GPU) memory while explaining; the message lists what to change."""


class InferenceModeError(Medcam3dError, RuntimeError):
    """Explaining was asked for under ``torch.inference_mode()``, which forbids the gradients it needs."""


class ConcurrentUseError(Medcam3dError, RuntimeError):
    """Two explanations on one model at the same time, where that cannot be made safe."""


# ----------------------------------------------------------------------------- geometry and files
class SpaceError(Medcam3dError, ValueError):
    """A grid (shape, affine) that is invalid, or two grids / an array that do not fit together."""


class PreprocessingError(Medcam3dError, ValueError):
    """A preprocessing config that cannot be built or applied."""


class UntrustedTransformError(UntrustedConfigError, PreprocessingError):
    """A preprocessing entry outside the side-effect-free transforms a config may name without ``--trust``."""


class ImageReadError(Medcam3dError, ValueError):
    """A file that exists but cannot be read as an image (corrupt, truncated, bad header ...)."""


class ImageNotFoundError(Medcam3dError, FileNotFoundError):
    """The image file or DICOM directory does not exist."""


class UnsupportedFormatError(Medcam3dError, ValueError):
    """A file extension that medcam3d cannot read or write."""


class VolumeError(ImageReadError):
    """A multi-volume (4D) image read without choosing a volume, or a volume of a 3D image."""


class VolumeIndexError(VolumeError, IndexError):
    """``volume=`` outside the image's range of volumes."""


class NonFiniteError(ImageReadError):
    """Image data containing NaN or infinite voxels (pass ``allow_nan=True`` to accept them)."""


class GeometryError(ImageReadError):
    """A scan whose geometry cannot be trusted (uneven or duplicated DICOM slices, absurd spacing ...)."""


class ImageTooLargeError(ImageReadError, MemoryError):
    """A header that claims more data than the file holds, or more than is allowed to be read."""


class UntrustedFileError(UntrustedError, ImageReadError):
    """An image header that would make medcam3d read files outside its own folder (or several
    files), refused unless ``trust=True`` (also an :class:`ImageReadError`: the image is not read)."""


class ImageWriteError(Medcam3dError, OSError):
    """Writing an image failed; no file was left at the target path."""


class UnwritableImageError(ImageWriteError, ValueError):
    """The array or grid cannot be stored (wrong shape, shear in a SimpleITK format, dtype ...)."""


class OutputPermissionError(ImageWriteError, PermissionError):
    """The output directory (or file) is not writable."""


class OutputDirectoryError(ImageWriteError, FileNotFoundError):
    """The output directory does not exist."""


# ----------------------------------------------------------------------------- jobs
class CohortError(Medcam3dError, ValueError):
    """Inputs that do not describe a cohort (missing files, a CSV without an image column, ...)."""


class CaseIdError(CohortError):
    """A case id that is not one safe path component, or ids that clash."""


class OutputConflictError(Medcam3dError, FileExistsError):
    """An output location that medcam3d may not write or replace (an input inside it, a folder it did not write)."""


class ShearWarning(UserWarning):
    """The image's voxel axes are not orthogonal (sheared affine)."""


class ChannelGridWarning(UserWarning):
    """An input channel (a second sequence) was not on the first channel's grid and was resampled onto it."""


class ProbabilityOutputWarning(UserWarning):
    """The model returns probabilities (a trailing softmax/sigmoid), not logits: what was explained instead."""


class PlacementWarning(UserWarning):
    """A layer's receptive field could not be found: its maps are placed by the align_corners convention."""


class ConcurrentUseWarning(RuntimeWarning):
    """Another thread called a model while medcam3d had part of it (a TorchScript or compiled module) in eval mode."""


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (``kill``, ``docker stop``, a scheduler's time limit).

    The ``medcam3d`` command raises it from its SIGTERM handler, in the main process and in the
    processes it forked (DataLoader workers, the batch writer). A ``KeyboardInterrupt``, so that it
    stops everything exactly as Ctrl-C does (partial case folders are removed, the output lock is
    released); the command then exits with :data:`EXIT_TERMINATED`.
    """


def exit_code(error: BaseException) -> int:
    """The ``medcam3d`` exit status for an exception that ended a command.

    Medcam3d errors carry their own code (2 for usage errors and unusable inputs); SIGTERM gives 143,
    Ctrl-C 130; anything else is an unexpected failure (1).
    """
    if isinstance(error, Terminated):
        return EXIT_TERMINATED
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, Medcam3dError):
        return int(error.exit_code)
    return EXIT_FAILURE


_TRACEBACK = "Traceback (most recent call last):"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_BANNER = re.compile(r"=+[^=]*=+")


def one_line(text: str, limit: int = 2000) -> str:
    """A message on one line, for the command's one error line.

    A message that embeds a traceback (MONAI's transforms and readers do) keeps its text before the
    traceback and the traceback's last line (the exception that caused it), joined by `` ... ``; the
    frames are dropped. Other line breaks and runs of white space become one space, terminal colour
    codes and control characters are removed, and a message longer than ``limit`` characters ends in
    ``...``.

    Parameters
    ----------
    text : str
    limit : int

    Returns
    -------
    str
        Never empty (``"(no message)"``).
    """
    text = _ANSI.sub("", str(text)).replace("\r\n", "\n").replace("\r", "\n")
    if _TRACEBACK in text:
        head, _, trace = text.partition(_TRACEBACK)
        frames = [line.strip() for line in trace.splitlines() if line.strip()]
        cause = frames[-1] if frames else ""
        lines = [line for line in head.splitlines() if not _BANNER.fullmatch(line.strip())]  # MONAI's "=== ... ==="
        head = " ".join(" ".join(lines).split()).rstrip(" .:")
        text = f"{head} ... {cause}" if head and cause else head or cause
    text = " ".join(_CONTROL.sub(" ", text).split())
    if len(text) > limit:
        text = text[: max(0, limit - 3)].rstrip() + "..."
    return text or "(no message)"


_SHORT = reprlib.Repr()
_SHORT.maxstring = 80
_SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = 8
_SHORT.maxlevel = 3


def short_repr(value: object) -> str:
    """A bounded repr for error messages (a config may hold megabytes in one value)."""
    try:
        return _SHORT.repr(value)
    except Exception:  # a hostile __repr__ from a Python caller
        return f"<{type(value).__name__}>"


def cause_line(error: BaseException, limit: int = 400) -> str:
    """``"Type: message"`` of the root cause of ``error``, on one line, for an error message.

    The chain of causes (``raise ... from``, or the exception being handled) is followed to its
    end, so a wrapper such as MONAI's ``RuntimeError("applying transform <...object at 0x...>")``
    gives way to what went wrong. Terminal colour codes are removed; a message that embeds a
    traceback (MONAI's ``LoadImage`` does) keeps its first line and the traceback's last line (the
    exception); other line breaks become spaces. At most ``limit`` characters.
    """
    root, seen = error, {id(error)}
    while True:
        cause = root.__cause__ if root.__cause__ is not None else (None if root.__suppress_context__ else root.__context__)
        if cause is None or id(cause) in seen:
            break
        seen.add(id(cause))
        root = cause
    try:
        text = _ANSI.sub("", str(root))
    except Exception:  # a hostile __str__
        text = ""
    if _TRACEBACK in text:
        head = text.split(_TRACEBACK, 1)[0].strip().splitlines()
        tail = [line.strip() for line in text.splitlines() if line.strip()]
        text = f"{head[0].strip() if head else ''} ... {tail[-1]}".strip(" .") if tail else (head[0] if head else "")
    text = " ".join(text.split())
    if not text:
        text = "(no message)"
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return f"{type(root).__name__}: {text}"
