"""Secrets never leave the process: one redaction function for every line and value gapm writes.

`redact(text)` masks, wherever they appear in a string:
  * the password in a URL's userinfo:   http://alice:pw@host      -> http://alice:***@host
  * secret query parameters:            ...?token=abc&x=1         -> ...?token=***&x=1
    (names like token, access_token, password, secret, key, sig, signature, X-Amz-Signature,
    X-Amz-Credential, X-Amz-Security-Token, X-Goog-Signature, client_secret, api_key)
  * assignments to secret-looking names: AWS_SECRET_ACCESS_KEY=abc, "password": "abc",
    MLFLOW_TRACKING_TOKEN=abc
  * HTTP credentials:                   Authorization: Bearer abc  -> Authorization: Bearer ***
  * AWS access key ids (AKIA.../ASIA...).
`redact_mapping(mapping)` does the same to every value of a (nested) mapping and masks the
whole value of a key named like a secret (params, tags, the resolved config).

Where it is applied (so that a secret in MLFLOW_TRACKING_URI, a data URL or a config value
reaches no log and no tracked record):
  * every log record of every logger, MLflow's and botocore's included: `install_log_redaction`
    (a log-record factory, set by `pipeline.console.configure_logging`), so a record is
    redacted when it is made, whichever handler writes it;
  * MLflow's "View run ... at: URL" lines, which MLflow writes to stdout itself rather than
    logging them: `install_stdout_redaction` wraps stdout and stderr line by line;
  * MLflow params, tags and the config.yaml artifact (pipeline.tracking.mlflow_sink), the run
    directory's params.json, tags.json and config.yaml, the CLI's error line and results.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import Any, TextIO

MASK = "***"

# A name that says its value is a secret, as a key of a mapping or in `name=value` text.
SECRET_NAME = re.compile(r"secret|passw|pwd|token|credential|signature|api_?key|access_?key|private_?key|"
                         r"auth|session_?key|cookie", re.IGNORECASE)
# Query parameters that carry secrets under short names (presigned URLs, SAS tokens, API keys).
SECRET_QUERY_NAMES = frozenset({"key", "sig", "sas", "code", "apikey", "x-amz-signature", "x-amz-credential",
                                "x-amz-security-token", "x-goog-signature", "x-goog-credential"})
NOT_SECRET_NAMES = frozenset({"author", "authority", "max_tokens", "tokenizer", "num_tokens"})

_USERINFO_PASSWORD = re.compile(  # the last '@' before the host ends the password (RFC 3986)
    r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@'\"]*:)(?P<secret>[^/\s'\"]+)(?=@[^/@\s'\"]+)")
_QUERY_PARAMETER = re.compile(r"(?P<head>[?&;](?P<name>[A-Za-z0-9_.\-]+)=)(?P<secret>[^&#\s'\"<>]+)")
_QUOTED_ASSIGNMENT = re.compile(  # 'password': 'x', "token" = "x" (dict reprs, JSON)
    r"(?P<head>(?P<quote>['\"])(?P<name>[A-Za-z0-9_.\-]{1,100})(?P=quote)\s*[:=]\s*(?P<value_quote>['\"]))"
    r"(?P<secret>[^'\"]*)(?P=value_quote)")
_BARE_ASSIGNMENT = re.compile(  # AWS_SECRET_ACCESS_KEY=x, --set storage.password=x, token="x"
    r"(?P<head>\b(?P<name>[A-Za-z0-9_.\-]*[A-Za-z0-9])=)(?P<secret>\"[^\"]*\"|'[^']*'|[^\s'\"&,;}\])]+)")
_HTTP_CREDENTIALS = re.compile(  # Authorization: Basic x, Bearer x
    r"(?P<head>\b(?:Bearer\s+|[Aa]uthorization['\"]?\s*[:=]\s*['\"]?(?:(?:Basic|Bearer|Token)\s+)?))"
    r"(?P<secret>[A-Za-z0-9._~+/=-]{6,})")
_AWS_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")


def is_secret_name(name: str) -> bool:
    """Does a key or parameter named `name` hold a secret (its whole value is masked)?"""
    lowered = name.lower()
    return lowered not in NOT_SECRET_NAMES and bool(SECRET_NAME.search(lowered))


def _masked(match: re.Match, tail: str = "") -> str:
    return match.group("head") + MASK + tail


def _mask_query(match: re.Match) -> str:
    name = match.group("name")
    secret = is_secret_name(name) or name.lower() in SECRET_QUERY_NAMES
    return _masked(match) if secret and match.group("secret") != MASK else match.group(0)


def _mask_quoted(match: re.Match) -> str:
    if not is_secret_name(match.group("name")) or match.group("secret") in ("", MASK):
        return match.group(0)
    return _masked(match, match.group("value_quote"))


def _mask_bare(match: re.Match) -> str:
    if not is_secret_name(match.group("name")) or match.group("secret").strip("'\"") == MASK:
        return match.group(0)
    return _masked(match)


def _mask_always(match: re.Match) -> str:
    return match.group(0) if match.group("secret") == MASK else _masked(match)


def redact(text: str) -> str:
    """`text` with every password, token and key masked (see the module docstring)."""
    if not text or not isinstance(text, str):
        return text
    text = _USERINFO_PASSWORD.sub(_mask_always, text)
    text = _QUERY_PARAMETER.sub(_mask_query, text)
    text = _QUOTED_ASSIGNMENT.sub(_mask_quoted, text)
    text = _BARE_ASSIGNMENT.sub(_mask_bare, text)
    text = _HTTP_CREDENTIALS.sub(_mask_always, text)
    return _AWS_ACCESS_KEY_ID.sub(MASK, text)


def redact_value(value: Any) -> Any:
    """A string redacted; any other value as it is."""
    return redact(value) if isinstance(value, str) else value


def redact_mapping(mapping: dict[str, Any]) -> dict[str, Any]:
    """A copy of a (nested) mapping: values of keys named like secrets masked whole, every
    other string (also in lists) redacted; None, numbers and empty strings kept."""
    redacted: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            redacted[key] = redact_mapping(value)
        elif is_secret_name(str(key)) and value not in (None, ""):
            redacted[key] = MASK
        elif isinstance(value, (list, tuple)):
            redacted[key] = [redact_mapping(item) if isinstance(item, dict) else redact_value(item) for item in value]
        else:
            redacted[key] = redact_value(value)
    return redacted


# --------------------------------------------------------------------------- log records

_installed_lock = threading.Lock()
_base_factory: Any = None


def _redacting_record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    try:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # Formatters use exc_text when it is set: the traceback's lines are redacted too.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    except Exception:  # noqa: BLE001 - a record that cannot be formatted is logging's to report
        pass
    return record


def install_log_redaction() -> None:
    """Redacts every log record of every logger from now on, when the record is made (once per
    process; idempotent)."""
    global _base_factory
    with _installed_lock:
        if _base_factory is None:
            _base_factory = logging.getLogRecordFactory()
            logging.setLogRecordFactory(_redacting_record_factory)


# --------------------------------------------------------------------------- stdout / stderr


class RedactingStream:
    """A text stream that redacts what is written to `target` a line at a time (so a URL is
    never split between two writes); everything else is the target's. Deliberately not an
    io.IOBase: garbage-collecting the wrapper must not close or flush the target."""

    MAX_PENDING = 65536  # a "line" without an end this long is written as it is

    def __init__(self, target: TextIO):
        self.target = target
        self._pending = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            cut = max(self._pending.rfind("\n"), self._pending.rfind("\r")) + 1
            if len(self._pending) > self.MAX_PENDING:
                cut = len(self._pending)
            if cut:
                complete, self._pending = self._pending[:cut], self._pending[cut:]
                self.target.write(redact(complete))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self.target.write(redact(self._pending))
                self._pending = ""
        self.target.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, buffer, ...
        return getattr(self.target, name)


def install_stdout_redaction() -> None:
    """Wraps sys.stdout and sys.stderr (once; idempotent) so that what libraries print there
    themselves — MLflow's "View run NAME at: URL" — is redacted too."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
