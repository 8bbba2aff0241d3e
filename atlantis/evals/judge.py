"""A client for any OpenAI-compatible chat-completions endpoint (stdlib only), for LLM-judged benchmarks.

`check(cfg)` fails fast, before any expensive work, with a clear `JudgeError`: no endpoint configured, the key's
environment variable unset, connection refused, the key rejected (HTTP 401/403), no such route.
`chat(cfg, messages)` sends one request (`model`, `messages`, `temperature`, `max_tokens`, as Arena-Hard-Auto's
`chat_completion_openai` does) and retries rate limits, server errors and timeouts with exponential backoff.

The API key is read from the environment variable named by `api_key_env` at call time and is never stored in a
config, a result or a log line: every error message goes through `redact`, which masks each key this process
has read (and anything shaped like a bearer token or an OpenAI key), so a server that echoes the key back in
its error body cannot leak it either.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from atlantis.config import field
from atlantis.log import get_logger

log = get_logger(__name__)

MASK = "***"
# Keys seen by this process (added when read from the environment); `redact` masks every one of them.
_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
# Token shapes masked even when the key was never read here (e.g. in a subprocess's stderr).
_TOKEN_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[^\s\"',]+"),
    re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"),
    # a key a server echoes half-masked ("Incorrect API key provided: sk-proj-****…abcd"): the whole token
    re.compile(r"[A-Za-z0-9_\-]*\*{4,}[A-Za-z0-9_\-]*"),
)
# A run of key characters this long that occurs in a key read here is a fragment of it (a server quoting the
# key's head or tail); shorter runs are too likely to be ordinary words.
_FRAGMENT = re.compile(r"[A-Za-z0-9_\-]{8,}")
# HTTP statuses worth retrying: rate limit and transient server errors.
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
# Local judges `judge.local` can name (served by atlantis.evals.local_judge for the duration of a run).
LOCAL_JUDGES = ("smoke",)


class JudgeError(RuntimeError):
    """The judge endpoint cannot be used (not configured, unreachable, key missing or rejected, bad reply)."""


@dataclass
class JudgeConfig:
    base_url: str | None = field(
        None, help="OpenAI-compatible API root, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1."
    )
    model: str = field("gpt-4-1106-preview", help="Judge model name (Arena-Hard-Auto v0.1: gpt-4-1106-preview).")
    api_key_env: str = field(
        "OPENAI_API_KEY",
        help="Name of the environment variable holding the API key (never the key itself); '' sends no key.",
    )
    temperature: float = field(0.0, help="Sampling temperature of the judge (Arena-Hard-Auto: 0).")
    max_tokens: int = field(4096, help="Most tokens per judge reply (Arena-Hard-Auto v0.1: 4096).")
    # A judgment is at most a few hundred tokens (the verdict, a short explanation): GPT-4-class endpoints answer in
    # well under a minute. 120 s leaves room for a slow one, and a hung server costs 2 minutes per attempt, not 5.
    timeout: float = field(120.0, help="Seconds to wait for one reply (each retry waits again).")
    retries: int = field(5, help="Retries of a rate-limited, failed (5xx) or timed-out request.")
    backoff: float = field(2.0, help="Seconds before the first retry; doubled for each further one.")
    local: str | None = field(
        None,
        help="Serve a local judge on 127.0.0.1 (a free port) for the run instead of calling base_url: 'smoke' is a "
        "deterministic FORMAT STAND-IN with no ground truth (rates by length, completeness, relevance, repetition; "
        "atlantis.evals.local_judge.SmokeJudge) that answers every protocol; no API key is needed.",
    )

    def __post_init__(self) -> None:
        if self.local is not None and self.local not in LOCAL_JUDGES:
            raise ValueError(f"local must be one of {list(LOCAL_JUDGES)} (or unset), got {self.local!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if self.retries < 0 or self.backoff < 0:
            raise ValueError("retries and backoff must be >= 0")
        if self.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            # A key pasted here by mistake must not end up in configs or logs: do not echo the value.
            raise ValueError("api_key_env must be the NAME of an environment variable (e.g. OPENAI_API_KEY)")


def redact(text: str) -> str:
    """`text` with every API key this process has read, and any bearer token or sk-… key, masked."""
    if not text:
        return text
    with _SECRETS_LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, MASK)
    if secrets:
        text = _FRAGMENT.sub(lambda m: MASK if any(m.group(0) in s for s in secrets) else m.group(0), text)
    text = _TOKEN_PATTERNS[0].sub(lambda m: m.group(1) + MASK, text)
    text = _TOKEN_PATTERNS[1].sub(MASK, text)
    return _TOKEN_PATTERNS[2].sub(MASK, text)


def public(cfg: JudgeConfig) -> dict[str, Any]:
    """The judge settings that go into results and provenance (no key, only the variable's name)."""
    out = {
        "base_url": redact(cfg.base_url or ""),
        "model": cfg.model,
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
        "api_key_env": cfg.api_key_env or None,
    }
    if cfg.local:
        out["local"] = cfg.local
    return out


def _api_key(cfg: JudgeConfig) -> str | None:
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env, "").strip()
    if not key:
        raise JudgeError(
            f"the judge's API key variable {cfg.api_key_env} is not set (export it, or set "
            "judge.api_key_env='' for a server that needs no key)"
        )
    with _SECRETS_LOCK:
        _SECRETS.add(key)
    return key


def endpoint(cfg: JudgeConfig) -> str:
    """The chat-completions URL of `cfg.base_url` (an API root such as .../v1, or the full route)."""
    if not cfg.base_url:
        raise JudgeError("no judge endpoint: set judge.base_url (e.g. https://api.openai.com/v1)")
    url = cfg.base_url.strip().rstrip("/")
    if not re.match(r"https?://[^/\s]+", url):
        raise JudgeError(f"judge.base_url must be an http(s) URL, got {redact(url)!r}")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _error_body(err: urllib.error.HTTPError) -> str:
    try:
        raw = err.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 (the body is only decoration for the message)
        return ""
    try:
        msg = json.loads(raw).get("error", {})
        raw = msg.get("message", raw) if isinstance(msg, dict) else str(msg)
    except (ValueError, AttributeError):
        pass
    return raw.strip()[:500]


class _NoRoute(JudgeError):
    """HTTP 404/405/501: the server has no such route (or model)."""


def _request(cfg: JudgeConfig, url: str, payload: dict[str, Any] | None, retries: int) -> dict[str, Any]:
    """POST `payload` (GET when None) to `url` with the key; the reply's JSON object. Retries 429/5xx/timeouts."""
    key = _api_key(cfg)
    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None
    if payload is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    where = redact(url)
    for attempt in range(retries + 1):
        problem: str
        req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:
                body = resp.read().decode("utf-8", "replace")
            try:
                out = json.loads(body)
            except ValueError:
                raise JudgeError(redact(f"judge endpoint {where} replied with non-JSON: {body[:200]!r}")) from None
            if not isinstance(out, dict):
                raise JudgeError(redact(f"judge endpoint {where} replied with {type(out).__name__}, not an object"))
            return out
        except urllib.error.HTTPError as err:
            detail = _error_body(err)
            if err.code in (401, 403):
                raise JudgeError(
                    redact(
                        f"judge endpoint {where} rejected the API key from ${cfg.api_key_env or '(none)'} "
                        f"(HTTP {err.code}): {detail}"
                    )
                ) from None
            if err.code in (404, 405, 501):
                raise _NoRoute(
                    redact(
                        f"judge endpoint {where}: HTTP {err.code} (no such route, or no model {cfg.model!r}): {detail}"
                    )
                ) from None
            if err.code not in _RETRY_STATUS:
                raise JudgeError(redact(f"judge endpoint {where}: HTTP {err.code}: {detail}")) from None
            problem = f"HTTP {err.code}: {detail}"
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, ConnectionRefusedError):
                raise JudgeError(redact(f"cannot reach the judge endpoint {where}: connection refused")) from None
            if isinstance(reason, socket.gaierror):
                raise JudgeError(redact(f"cannot reach the judge endpoint {where}: unknown host ({reason})")) from None
            problem = f"{type(reason).__name__}: {reason}"
            if isinstance(reason, TimeoutError):
                problem = f"no reply within judge.timeout={cfg.timeout:g} s ({reason})"
        except TimeoutError as err:  # a read timeout: the setting that decides it, in the message
            problem = f"no reply within judge.timeout={cfg.timeout:g} s ({err})"
        except (ConnectionError, OSError) as err:  # reset connection
            problem = f"{type(err).__name__}: {err}"
        if attempt == retries:
            raise JudgeError(redact(f"judge endpoint {where} failed after {retries + 1} attempt(s): {problem}"))
        wait = cfg.backoff * 2**attempt
        log.warning("judge request failed (%s); retry %d/%d in %.1fs", redact(problem), attempt + 1, retries, wait)
        time.sleep(wait)
    raise AssertionError("unreachable")


def chat(
    cfg: JudgeConfig, messages: list[dict[str, str]], *, max_tokens: int | None = None, retries: int | None = None
) -> str:
    """The judge's reply text to `messages` (a list of {"role", "content"}), at the config's temperature."""
    payload = {
        "model": cfg.model,
        "messages": messages,
        "temperature": cfg.temperature,
        "max_tokens": max_tokens or cfg.max_tokens,
    }
    out = _request(cfg, endpoint(cfg), payload, cfg.retries if retries is None else retries)
    try:
        content = out["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeError(redact(f"judge reply has no choices[0].message.content: {json.dumps(out)[:300]}")) from None
    return content if isinstance(content, str) else ""


def check(cfg: JudgeConfig) -> None:
    """Fail fast, with a `JudgeError`, if the judge cannot be used; nothing is retried.

    The endpoint and the key variable are checked before any network traffic; then `GET <base>/models` proves
    the server answers and accepts the key (a judge model missing from its list is only a warning: servers
    list aliases differently). A server without /models gets a 1-token chat request instead. With `local` set
    (`atlantis judge-check local=smoke`), that local judge is served for the check and probed with one request.
    """
    if cfg.local:
        from atlantis.evals.local_judge import judge_endpoint

        with judge_endpoint(cfg) as served:
            check(served)
            chat(served, [{"role": "user", "content": "Reply with OK."}], max_tokens=1, retries=0)
        return
    url = endpoint(cfg)  # no endpoint / not a URL
    _api_key(cfg)  # key variable unset
    log.info("checking the judge endpoint %s (model %s)", redact(url), cfg.model)
    try:
        listing = _request(cfg, url.removesuffix("/chat/completions") + "/models", None, retries=0)
    except _NoRoute:
        chat(cfg, [{"role": "user", "content": "Reply with OK."}], max_tokens=1, retries=0)
        return
    data = listing.get("data")
    ids = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
    if ids and cfg.model not in ids:
        log.warning("judge model %r is not in the endpoint's model list %s", cfg.model, ids[:10])
