"""Error types: raised deep in the library, turned into one-line messages at the CLI and HTTP edges.

Every error carries the exit code the CLI should use and the HTTP status the server should answer with,
so the edges never have to guess from the message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from archiver.serving.worker.tracebacks import UserTrace


class ArchiverError(Exception):
    """Base of every error this project raises on purpose. The message is one line, for a user."""

    exit_code: int = 1
    http_status: int = 500

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if http_status is not None:  # this one error's own status (an answer from a worker carried it)
            self.http_status = http_status

    def __str__(self) -> str:
        return self.message


class UsageError(ArchiverError):
    """The command line or the call was wrong (bad option value, incompatible options)."""

    exit_code = 2
    http_status = 400


class InputFileError(ArchiverError):
    """A file the user named does not exist or cannot be read."""


class ModelNameError(ArchiverError):
    """The model name breaks TorchServe's naming rule."""


class OutputExistsError(ArchiverError):
    """The target archive exists and --force was not given; the old file is left untouched."""


class DuplicateEntryError(ArchiverError):
    """Two inputs would land on the same path inside the archive."""


class ConfigError(ArchiverError):
    """A model-config.yaml (or a server config file) is not valid YAML or has keys of the wrong type."""


class ManifestError(ArchiverError):
    """MAR-INF/MANIFEST.json is missing, not JSON, or has fields of the wrong type."""


class ArchiveFormatError(ArchiverError):
    """The file is not a readable archive: not a zip or tgz, truncated, or corrupt."""


class UnsafeArchiveError(ArchiveFormatError):
    """The archive tries something hostile: path traversal, links, devices, duplicates, a bomb."""


class MemberNotFoundError(ArchiverError, KeyError):
    """The archive has no file of that name (also a KeyError, so ``except KeyError`` works)."""


class IntegrityError(ArchiverError):
    """A file's bytes do not match the sha256 or size the manifest records, or a listed file is absent."""


class ExportError(ArchiverError):
    """A model could not be traced, scripted or exported, or the result disagrees with the eager model."""


class HandlerError(ArchiverError):
    """A handler cannot be resolved, imported or initialized.

    ``trace`` (set by the loader when the handler's own code raised) holds the frames in the archive's
    files, which the CLI prints under the one-line message.
    """

    trace: UserTrace | None = None


class HandlerInputError(ArchiverError):
    """One request's payload cannot be used (not an image, too many pixels, bad encoding).

    Handlers raise it, or return an instance of it at that request's index, so that only that request
    fails (HTTP 400 with this message) while the rest of the batch is answered.
    """

    http_status = 400


class DependencyError(ArchiverError):
    """An archive's requirementsFile cannot be installed (``serve --install-model-deps``): pip failed,
    or the file asks for something the server refuses (a local path, an editable install, another index).

    The message is one line and ends with pip's last lines; it becomes the model's load error (503).
    """

    http_status = 503


class ExplanationUnsupportedError(ArchiverError):
    """An explanation was asked of a handler that has no ``get_insights`` (TorchServe's explanation
    hook), or whose explainer (Captum) is not installed."""

    http_status = 501


class ModelNotFoundError(ArchiverError):
    """No model (or version) of that name is registered."""

    http_status = 404


class ServiceUnavailableError(ArchiverError):
    """The model is not ready (failed to load, no workers) or its queue is full."""

    http_status = 503


class RequestTimeoutError(ArchiverError):
    """The model did not answer within its response timeout."""

    http_status = 504


class RequestTooLargeError(ArchiverError):
    """The request body is over the server's size limit."""

    http_status = 413


class ConflictError(ArchiverError):
    """A model with that name and version is already registered."""

    http_status = 409


class ForbiddenError(ArchiverError):
    """The operation would leave a model without its default version."""

    http_status = 403


class BodyTimeoutError(ArchiverError):
    """The client did not send its whole body within ``body_read_timeout_s``."""

    http_status = 408


class UnauthorizedError(ArchiverError):
    """The request has no valid ``Authorization: Bearer`` token."""

    http_status = 401


class CrossSiteRequestError(ArchiverError):
    """A server without a token refused a request for another host name (DNS rebinding) or from another
    web origin (a page the user visits): ``serving/site_guard.py``."""

    http_status = 403


class WorkerDiedError(ArchiverError):
    """The worker process ended while it held a batch; every request of the batch gets this 500."""

    http_status = 500


class SequenceError(ArchiverError):
    """A request names a sequence (``ts_request_sequence_id``) that cannot take it: ended by its
    handler, expired, or lost with its worker (410), never issued by this server (404), or malformed (400)."""

    http_status = 410


class WireError(ArchiverError):
    """A peer on the front-worker socket sent something that is not a frame of ours (broken or hostile),
    or a frame is too large to send."""


class WorkerGoneError(ArchiverError):
    """The worker process ended before it took the batch: the batch never ran and can go elsewhere."""


class WorkerStartError(HandlerError):
    """The worker could not load the model: its handler failed, or the process died while loading.

    ``cause`` is the death's cause when the process ended (a signal name, "exit", "timeout"), else
    "load_failed" (the handler raised).
    """

    def __init__(self, message: str, cause: str = "load_failed") -> None:
        super().__init__(message)
        self.cause = cause


class BatchTooLargeError(ArchiverError):
    """A batch is larger than the model was compiled for (an AOTInductor package's ``--max-batch``).

    Every request of that batch gets this 500 and the worker goes on; the cure is on the server's
    side (a smaller ``batch_size``, or a package exported with a larger ``--max-batch``).
    """


class TensorRequestError(UsageError):
    """An Open Inference Protocol (v2) or KServe v1 request is malformed: a shape that disagrees with its
    data, an unknown datatype, a binary size past the body's end, an unknown output name, JSON nested too
    deep. HTTP 400, with a message naming the input and the fault."""


class MissingExtraError(ArchiverError):
    """An optional engine is not installed (``torchmar[ray]``, ``torchmar[kserve]``): the message names
    the extra and the pip command that installs it. Exit 1."""


class SignatureError(ArchiverError):
    """An archive's signature does not let it load (``archiver/signing.py``): HTTP 403, exit 1.

    ``reason`` is one word from a closed set, the label ``/metrics`` counts refusals by. This base is
    raised for a signature whose bytes do not verify under the trusted key its bundle names (the
    signature file was altered); the subclasses below say the other ways a check fails.
    """

    http_status = 403
    reason = "invalid"


class MissingSignatureError(SignatureError):
    """Trusted keys are set and the archive has no signature file (``ARCHIVE.sig``)."""

    reason = "missing"


class MalformedSignatureError(SignatureError):
    """The signature file is not an OpenSSF model-signing bundle (truncated, not JSON, wrong fields)."""

    reason = "malformed"


class UntrustedSignerError(SignatureError):
    """The archive is signed, but by a key that is none of the trusted keys."""

    reason = "untrusted_key"


class TamperedArchiveError(SignatureError):
    """The archive's bytes (or a folder's file) differ from what was signed."""

    reason = "tampered"


class WrongArchiveSignatureError(SignatureError):
    """The signature file was made for another archive (another name and other bytes)."""

    reason = "other_archive"


class UnsignableSourceError(SignatureError):
    """Trusted keys are set and the source is one the server cannot hold to its signature: a folder,
    whose files may change between the check and a worker's load."""

    reason = "folder"


class UnpinnableSignatureError(SignatureError):
    """Trusted keys are set and the signature hashes a file archive in shards or with another algorithm
    than sha256: its check gives no sha256 of the whole file to hold a load to."""

    reason = "unpinnable"


def one_line(text: str) -> str:
    """``text`` on one line: each run of whitespace, newlines included, becomes one space."""
    return " ".join(text.split())


def reason(exc: BaseException, *, typed: bool = True) -> str:
    """Why ``exc`` happened, in one line for a message: the first line of its text (whitespace runs made
    one space), after its type's name when ``typed``; the type's name alone when the text is empty.

    The one helper every layer uses to quote an exception it wraps in an ArchiverError (answers to
    clients go through ``redaction.public_message``, which also shortens paths)."""
    lines = str(exc).strip().splitlines()
    line = one_line(lines[0]) if lines else ""
    if not line:
        return type(exc).__name__
    return f"{type(exc).__name__}: {line}" if typed else line
