"""Credential scrubbing: no secret a record carries reaches MLflow (README, "Credentials in traces").

LiteLLM logs a key's hash, not the key, yet keys still turn up in what it logs verbatim: an
upstream 401 quotes the key it was sent, a client tags a request with one, Gemini takes it in the
URL, model parameters carry ``api_key`` or an ``Authorization`` header, a misconfigured proxy logs
the key in place of its hash. So every string a trace carries is scrubbed on its way out, found by
where it sits (a value under a credential-like name, in a dict or as ``name=value`` in text, a URL
password or query key, a command line's ``--api-key …`` or ``curl -u user:…``) and by its shape
(``sk-…``, ``AKIA…``, JWTs, PEM blocks, …).

A secret becomes ``[REDACTED:<fingerprint>]``: the first 8 hex digits of an HMAC-SHA256 of the
secret, so traces that used the same key can still be matched without revealing it. Scrubbing runs
on attacker-controlled text: it never raises, its regexes have no nested quantifiers, and scrubbing
a scrubbed value changes nothing.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable
from typing import Any

from ingest.mlflow_names import SpanAttributeKey, TraceTagKey

SALT_ENV = "LITELLM_INGEST_SCRUB_SALT"
DEFAULT_SALT = "litellm-ingest/scrub/v1"
"""Domain separation only: anyone can recompute a fingerprint of a guessed key with it. A team that
sets its own salt (the same on every host, or fingerprints will not match across them) makes short
keys unguessable from their fingerprint."""
MARKER = re.compile(r"\[REDACTED:[0-9a-f]{8}\]")
CONTENT_KEYS = frozenset({"messages", "input", "prompt"})
OWN_VALUES = frozenset(
    {
        SpanAttributeKey.CHAT_USAGE,
        SpanAttributeKey.LLM_COST,
        SpanAttributeKey.LOG_LEVEL,
        SpanAttributeKey.MESSAGE_FORMAT,
        SpanAttributeKey.SPAN_TYPE,
        SpanAttributeKey.TRACE_TAG_PREFIX + TraceTagKey.TRACE_NAME,
        "litellm.log_format",
    }
)
"""Span attributes whose values are ours or MLflow's words and numbers (the trace name's call type is
scrubbed as it is built): never rewritten by a ``--scrub-pattern``, or MLflow would lose the trace's
tokens, cost, type or name."""
"""The prompt inside the inputs attribute; with ``content=False`` it, the outputs and
``raw_llm_response`` pass verbatim."""

_NOT_SECRET, _SECRET, _HASH = 0, 1, 2

_SECRET_NAMES = frozenset(
    {
        "api_key", "apikey", "authorization", "proxy_authorization", "token", "access_token", "refresh_token", "id_token",
        "session_token", "auth_token", "bearer_token", "secret", "secrets", "client_secret", "secret_key", "password", "passwd",
        "passphrase", "cookie", "set_cookie", "private_key", "credential", "credentials", "master_key", "access_key",
        "secret_access_key", "accountkey", "account_key", "sharedaccesskey", "shared_access_key", "subscription_key", "pwd",
    }
)  # fmt: skip
_SECRET_SUFFIXES = (
    "_api_key", "_apikey", "_secret", "_secret_key", "_token", "password", "passwd", "_pwd", "_passphrase", "_credential",
    "_credentials", "_private_key", "_master_key", "_access_key", "_account_key", "_cookie", "_authorization", "_subscription_key",
)  # fmt: skip
_SQUASHED_SUFFIXES = ("apikey", "secretkey", "accesskey", "privatekey", "password", "passphrase", "credentials")
"""Suffixes that end a credential name however its words were run together (``OpenAIAPIKey``: two
acronyms no case change separates)."""
_TOKEN_NAMES_NOT_SECRET = frozenset(
    f"{p}_token"
    for p in (
        "max", "prompt", "completion", "total", "input", "output", "reasoning", "cached", "eos", "bos", "pad", "unk", "sep", "cls",
        "mask", "stop", "start", "end", "first", "last", "special", "image", "audio", "video", "tool",
    )
)  # fmt: skip
_HASH_NAMES = frozenset({"user_api_key_hash"})
"""LiteLLM logs a key's sha256 here: kept when it is hex (or LiteLLM's label for the master key),
else it is taken for the key itself."""
_KEY_LABELS = frozenset({"litellm_proxy_master_key"})
_HEX = re.compile(r"[0-9a-fA-F]{16,128}")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
"""Where camelCase words meet, an acronym's end too: ``openAIApiKey`` is ``open_ai_api_key``."""
_IGNORECASE_EXTRA = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})
"""Non-ASCII letters ``re.IGNORECASE`` takes for ASCII ones (İ ı ſ K)."""


@functools.lru_cache(maxsize=8192)
def name_kind(name: str) -> int:
    """What a value under this name is: normalized case-insensitively, ``-``, ``+`` and spaces as
    ``_``, camelCase split, and only the last dotted part counts (``mlflow.traceTag.api_key`` is
    ``api_key``), or the last two where the last says nothing (``openai.api.key``, a Java property)."""
    kind = _kind(_normalized(name))
    if kind == _NOT_SECRET and "." in name:
        kind = _kind(_normalized("_".join(name.rsplit(".", 2)[-2:])))
    return kind


def _kind(n: str) -> int:
    if n in _HASH_NAMES:
        return _HASH
    if n in _TOKEN_NAMES_NOT_SECRET:
        return _NOT_SECRET
    if n in _SECRET_NAMES or n.endswith(_SECRET_SUFFIXES) or n.replace("_", "").endswith(_SQUASHED_SUFFIXES):
        return _SECRET
    return _NOT_SECRET


def _normalized(name: str) -> str:
    n = name.strip().strip("\"'")
    if not n.isascii():
        n = n.translate(_IGNORECASE_EXTRA)
    n = _CAMEL.sub("_", n).lower().replace("-", "_").replace(" ", "_").replace("+", "_")
    return n.rpartition(".")[2]


_KEY = r"A-Za-z0-9_\-"
_SCHEME = re.compile(r"\s{0,8}(?P<scheme>(?i:bearer|basic|token|digest)[ \t]{1,3})?")
_NAME = r"(?i:[a-z0-9_.\-])"
"""A character of a name in text: ``re.IGNORECASE`` also takes İ ı ſ K here, as ``name_kind`` does.
A name is one word, or two joined by a space or ``+`` (``API Key:``, ``secret key=``)."""
_PAIR_PARTS = ("key", "secret", "token", "pass", "pwd", "authorization", "cookie", "credential")
"""What every credential name has in it (any case): the pattern weighs only the names that do."""
_HEADER_NAMES = frozenset({"cookie", "set_cookie", "authorization", "proxy_authorization"})
"""Their value is the rest of the line: a cookie list (``a=b; session=…``), an auth scheme and its
parameters."""
_VALUE = re.compile(
    rf"(?P<scheme>(?i:bearer|basic|token|digest)[ \t]{{1,3}})?(?:(?!{MARKER.pattern})[\[({{])?"
    r"(?P<v>(?!(?i:bearer|basic|token|digest)[ \t])[^\s\"',&<>{}\[\]()\\]{1,4096})"
)
"""An unquoted value: one word, ``;`` inside it (``Tr0ub4dor;x``), after an opening bracket if any."""
_QUOTED = {
    '"': re.compile(r'(?:[^"\\\n]|\\.){1,4096}'),
    "'": re.compile(r"(?:[^'\\\n]|\\.){1,4096}"),
    "`": re.compile(r"(?:[^`\\\n]|\\.){1,4096}"),
    "\\": re.compile(r"[^\"'\\\n]{1,4096}"),
}
"""A quoted value, up to its closing quote (its escapes kept), by its quote; an escaped quote (JSON
in a string) is closed by the next backslash."""
_LINE = re.compile(r"[^\r\n\"'\\]{1,4096}")
_WORD = re.compile(r"[ \t]{1,4}[^\s\"',&<>{}\[\]()\\:=\uff1a\uff1d]{1,4096}(?=[\s\"',&<>{}\[\]()\\]|\Z)")
"""The next word of a passphrase: one with ``:`` or ``=`` in it is the next name."""
_NEXT_LINE = re.compile(r"\r?\n[ \t]{0,64}")
"""A name's line ends after its ``:``: its value may stand alone on the next (YAML)."""
_LINE_END = re.compile(r"[ \t]{0,64}(?:\r?\n|\Z)")
_PHRASE_NAMES = ("password", "passwd", "pwd", "passphrase")
"""A value under such a name (or one ending in it) after ``:`` may be words, ``password: correct horse …``."""
_PROSE = frozenset(
    {
        "is", "are", "was", "were", "be", "been", "being", "has", "have", "had", "do", "does", "did", "will", "would", "can", "cannot",
        "could", "should", "must", "may", "might", "shall", "not", "required", "missing", "invalid", "incorrect", "expired", "empty",
        "wrong", "unknown", "unset", "optional", "provided", "needed", "see", "use", "enter",
    }
)  # fmt: skip
"""A value after ``:`` that starts with one of these is prose, not a value: ``the token: is missing``,
``Password: required``, ``Invalid password: must be …``."""
_COMMON = frozenset(
    {
        "a", "an", "the", "this", "that", "these", "those", "it", "its", "no", "any", "some", "each", "every", "all", "to", "of", "in",
        "on", "at", "for", "from", "with", "by", "as", "and", "or", "but", "if", "so", "then", "than", "via", "i", "you", "we", "they",
        "he", "she", "my", "your", "our", "their", "his", "her", "please",
    }
)  # fmt: skip
"""One of these starts prose when it is the value or one of these words is among the next two (``Password:
the one you chose``); a passphrase may start with one (``password: my pass phrase``)."""


def _prose(words: list[str]) -> bool:
    """Whether a value's first (up to three) words, lowercased, are prose."""
    first = words[0]
    if first in _PROSE:
        return True
    return first in _COMMON and (len(words) == 1 or any(w in _PROSE or w in _COMMON for w in words[1:]))


_GAP_CHARS = " \t\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u200b\u202f\u205f\u3000"
_GAP = f"[{_GAP_CHARS}]"
"""Space between a name, its separator and its value: a no-break or wide space too (text pasted from a wiki)."""
_TYPE = (
    r"&?(?:'[a-z]{1,16}[ \t]{1,4})?(?:mut[ \t]{1,4})?[A-Za-z_][A-Za-z0-9_.<>&\[\]]{0,64}"
    r"(?:[ \t]{0,4}\|[ \t]{0,4}[A-Za-z_][A-Za-z0-9_.<>\[\]]{0,32})?"
)
_ANNOTATION = rf"(?::{_GAP}{{0,4}}{_TYPE}|string)(?:{_GAP}{{1,16}}=|=(?={_GAP}{{0,16}}[bBuUrRfF]{{0,2}}\\{{0,3}}[\"']))(?!=)"
"""A type between a name and its ``=`` in code (``apiKey: string =``, ``api_key: &'static str =``, ``api_key:
str | None =``, Go's ``var apiKey string =``): the value is after the ``=``, the type is no value. Taken
before a ``=`` after space, or before a quoted value (``token: abc=def`` is a value with ``=`` in it)."""
_FAT_ARROW = rf"=>(?={_GAP}{{0,16}}[bBuUrRfF]{{0,2}}\\{{0,3}}[\"'])"
"""A PHP array's, a Ruby or Perl hash's ``=>`` (``'api_key' => '…'``): a separator only before a quoted
value, so a JS arrow (``token => token.trim()``) and code that reads a key (``=> env('…')``) are kept."""
_QUERY_NAMES = (
    r"key|api(?:[_-]|%5[Ff])?key|apikey|token|access(?:[_-]|%5[Ff])?token|id(?:[_-]|%5[Ff])?token|auth|sig|signature"
    r"|x-amz-signature|x-amz-security-token|x-amz-credential|x-goog-signature|x-goog-credential|code"
    r"|client(?:[_-]|%5[Ff])?secret|password|secret"
)
_TOKEN_SHAPES = (
    r"[sr]k_(?:live|test)_[A-Za-z0-9]{8,255}",
    r"AIza[A-Za-z0-9_\-]{35}(?![A-Za-z0-9_\-])",
    r"ya29\.[A-Za-z0-9_\-]{20,2048}",
    r"eyJ[A-Za-z0-9_\-]{6,4096}\.eyJ[A-Za-z0-9_\-]{2,8192}\.[A-Za-z0-9_\-]{0,4096}",
    r"gh[pousr]_[A-Za-z0-9]{20,255}",
    r"github_pat_[A-Za-z0-9_]{40,255}",
    r"glpat-[A-Za-z0-9_\-]{20,255}",
    r"xox[abposre]-[A-Za-z0-9\-]{10,255}",
    r"hf_[A-Za-z0-9]{20,255}",
    r"gsk_[A-Za-z0-9]{20,255}",
    r"xai-[A-Za-z0-9]{20,255}",
    r"r8_[A-Za-z0-9]{20,255}",
    r"pplx-[A-Za-z0-9]{20,255}",
    r"tvly-[A-Za-z0-9_\-]{20,255}",
    r"npm_[A-Za-z0-9]{36}",
    r"dapi[a-f0-9]{32}",
    r"lsv2_(?:pt|sk)_[a-f0-9]{32}_[a-f0-9]{10}",
    r"SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}",
    r"csk-[A-Za-z0-9]{20,255}",
    r"nvapi-[A-Za-z0-9_\-]{20,255}",
    r"jina_[A-Za-z0-9]{40,255}(?![A-Za-z0-9_\-])",
    r"pcsk_[A-Za-z0-9]{4,12}_[A-Za-z0-9]{30,255}",
    r"fw_[A-Za-z0-9]{20,255}(?![A-Za-z0-9_\-])",
    r"esecret_[A-Za-z0-9]{20,255}",
)
_PATTERNS: tuple[tuple[str, str], ...] = (
    (
        "pem",
        r"-----BEGIN [A-Z0-9 ]{0,60}PRIVATE KEY-----"
        r"(?:[\s\S]{0,8192}?-----END [A-Z0-9 ]{0,60}PRIVATE KEY-----|[A-Za-z0-9+/=\s\\_\-]{0,8192})",
    ),
    ("userinfo", r"(?<=://)(?P<userinfo_u>[^\s/:@\[\]]{0,256}):(?P<userinfo_v>[^\s/?#\"'<>\\]{1,1024})(?=@)"),
    (
        "query",
        rf"(?i:[?&](?:{_QUERY_NAMES})=)(?P<query_v>[^&#\s\"'<>\\\[\]]{{1,4096}})"
        rf"|;(?!(?i:code)=)(?i:(?:{_QUERY_NAMES}|jsessionid)=)(?P<matrix_v>[^/;?&#\s\"'<>\\\[\]]{{1,4096}})",
    ),
    (
        "encoded",
        rf"(?:(?<=%26)|(?<=%3[Ff])|(?<![A-Za-z0-9_%\-]))(?i:{_QUERY_NAMES})%3[Dd]"
        r"(?P<encoded_v>(?:[^%&#\s\"'<>\\\[\]]|%(?!26)){1,4096})",
    ),
    (
        "auth",
        r"(?i:auth)(?:\\{0,3}[\"']?[ \t]{0,16}[:=][ \t]{0,16}[(\[]|(?<=Auth)\()[ \t]{0,16}"
        r"(?:\\{0,3}[\"'][^\"'\\\n]{0,256}\\{0,3}[\"']|[A-Za-z_][A-Za-z0-9_.]{0,64})[ \t]{0,16},[ \t]{0,16}"
        r"\\{0,3}[\"'](?P<auth_v>[^\"'\\\n]{1,1024})\\{0,3}[\"'](?=[ \t]{0,16}[)\]])",
    ),
    (
        "env",
        rf"ENV(?<![^\n \t]ENV)[ \t]{{1,16}}(?P<env_n>(?={_NAME}{{0,64}}?(?i:{'|'.join(_PAIR_PARTS)})){_NAME}{{1,128}})"
        r"(?P<env_sep>[ \t]{1,16})(?P<env_q>\\{0,3}[\"'])?",
    ),
    (
        "call",
        r"(?:(?i:setdefault|putenv|setenv|set_var|setenvironmentvariable|getenv|environ\.get|env\.fetch|setproperty|getproperty|(?<![A-Za-z0-9_])put)\("
        r"|[(\[](?<![A-Za-z0-9_$)\]][(\[]))"
        rf"{_GAP}{{0,4}}(?:[bB](?=\\{{0,3}}[\"']))?\\{{0,3}}[\"'](?P<call_n>(?={_NAME}{{0,64}}?(?i:{'|'.join(_PAIR_PARTS)})){_NAME}{{1,128}})"
        rf"(?P<call_sep>\\{{0,3}}[\"']{_GAP}{{0,4}},{_GAP}{{0,16}})(?P<call_q>(?:[bBuUrRfF]{{1,2}}(?=\\{{0,3}}[\"']))?\\{{0,3}}[\"'])",
    ),
    (
        "nv",
        rf"(?<![A-Za-z0-9_])(?i:name|key)\\{{0,3}}[\"']?{_GAP}{{0,16}}[:=]{_GAP}{{0,16}}\\{{0,3}}[\"']?"
        rf"(?P<nv_n>(?=(?:{_NAME}|:){{0,64}}?(?i:{'|'.join(_PAIR_PARTS)}))(?:{_NAME}|:){{1,128}})"
        rf"(?P<nv_sep>\\{{0,3}}[\"']?{_GAP}{{0,16}}[,;]?\s{{0,64}}?(?:-{_GAP}{{1,16}})?\\{{0,3}}[\"']?"
        rf"(?i:value)\\{{0,3}}[\"']?{_GAP}{{0,16}}[:=]{_GAP}{{0,16}})(?P<nv_q>\\{{0,3}}[\"'])?",
    ),
    (
        "user",
        r"(?<![^\s\"'])(?:(?P<user_o>-[uUa])[ \t]{0,4}|--(?P<user_l>(?:proxy-)?user|auth)(?:[ \t]{1,4}|=))"
        r"(?P<user_q>\\{0,3}[\"'])?(?P<user_u>[^\s:\"'\\\[\]]{0,256}):"
        r"(?P<user_v>(?(user_q)[^\"'\\\n]{1,1024}|[^\s\"'\\;&|()<>`]{1,1024}))",
    ),
    (
        "pw",
        r"(?<![^\s\"'])-(?P<pw_o>[paPw])(?P<pw_sp>[ \t]{1,4})?(?P<pw_q>\\{0,3}[\"'])?"
        r"(?P<pw_v>(?(pw_q)[^\"'\\\n]{1,1024}|[^\s\"'\\;&|()<>`]{1,1024}))",
    ),
    (
        "flag",
        rf"(?<![^\s\"'(\[,])--(?P<flag_n>(?={_NAME}{{0,64}}?(?i:{'|'.join(_PAIR_PARTS)})){_NAME}{{1,64}})"
        r"(?P<flag_sep>[ \t]{1,4})(?P<flag_q>\\{0,3}[\"'])?",
    ),
    (
        "pair",
        rf"(?<!{_NAME})(?P<pair_n>(?:{_NAME}{{1,32}}[ +])?(?={_NAME}{{0,64}}?(?i:{'|'.join(_PAIR_PARTS)})){_NAME}{{1,128}})"
        rf"(?P<pair_sep>\\{{0,3}}[\"']?(?:{_GAP}{{0,4}}\])?{_GAP}{{0,16}}(?:{_ANNOTATION}|:=|={{2,3}}|{_FAT_ARROW}|<<?-|[:=\uff1a\uff1d]){_GAP}{{0,16}})(?P<pair_q>(?:\[{_GAP}{{0,4}})?(?:[bBuUrRfF]{{1,2}}(?=\\{{0,3}}[\"']))?\\{{0,3}}[\"']|`)?",
    ),
    (
        "xml",
        rf"<(?P<xml_n>(?={_NAME}{{0,64}}?(?i:{'|'.join(_PAIR_PARTS)})){_NAME}{{1,128}})>(?P<xml_v>[^<\n]{{1,4096}})</(?P=xml_n)>",
    ),
    (
        "bearer",
        r"[Bb]earer(?:(?<![A-Za-z0-9].{6})|(?<=%20.{6}))(?:[ \t]{1,3}|%20|\+)"
        r"(?P<bearer_v>(?:[A-Za-z0-9._~+/=\-]|%2[BbFf]|%3[Dd]){6,4096})"
        r"|Basic(?:(?<![A-Za-z0-9].{5})|(?<=%20.{5}))(?:[ \t]{1,3}|%20|\+)"
        r"(?P<basic_v>(?:[A-Za-z0-9+/]|%2[BbFf]){6,4096}(?:=|%3[Dd]){0,2})",
    ),
    ("sk", rf"sk-(?:(?<![A-Za-z0-9_]...)|(?<=%[0-9A-Fa-f]{{2}}sk-))[{_KEY}]{{3,512}}"),
    ("aws", r"(?:AKIA|ASIA|ABIA|ACCA)(?:(?<![A-Za-z0-9]....)|(?<=%[0-9A-Fa-f]{2}....))[A-Z0-9]{16}(?![A-Za-z0-9])"),
    ("shape", rf"(?:(?<![{_KEY}])|(?<=%[0-9A-Fa-f]{{2}}))(?:{'|'.join(_TOKEN_SHAPES)})"),
)
_NV = re.compile(dict(_PATTERNS)["nv"])
_GATED = ("env", "nv", "flag", "user", "encoded", "pw")
"""The alternatives tried only in a text that may hold them (see :func:`_builtin`)."""
_BUILTINS: dict[tuple[bool, ...], re.Pattern[str]] = {}
"""Lookbehinds after a literal where they can be: ``re`` tries every alternative at every position."""


def _compiled(gates: tuple[bool, ...]) -> re.Pattern[str]:
    """The alternatives, with those of ``_GATED`` whose gate is on: compiled at first use (~20 ms each,
    32 variants)."""
    pattern = _BUILTINS.get(gates)
    if pattern is None:
        off = {name for name, on in zip(_GATED, gates, strict=True) if not on}
        pattern = _BUILTINS[gates] = re.compile("|".join(f"(?P<{n}>{p})" for n, p in _PATTERNS if n not in off))
    return pattern


_BUILTIN = _compiled((False,) * len(_GATED))
_VALUE_GROUPS = {
    "query": ("query_v", "matrix_v"),
    "encoded": ("encoded_v",),
    "auth": ("auth_v",),
    "bearer": ("bearer_v", "basic_v"),
}
"""The alternatives whose secret is one group of their match (the rest of it kept)."""
_CAP = 4096
_REST = {
    _VALUE.pattern: re.compile(r"[^\s\"',&<>{}\[\]()\\]*"),
    _LINE.pattern: re.compile(r"[^\r\n\"'\\]*"),
    **{q.pattern: re.compile(q.pattern.rpartition("{")[0] + "*") for q in _QUOTED.values()},
    "bearer_v": re.compile(r"(?:[A-Za-z0-9._~+/=\-]|%2[BbFf]|%3[Dd])*"),
    "query_v": re.compile(r"[^&#\s\"'<>\\\[\]]*"),
    "matrix_v": re.compile(r"[^/;?&#\s\"'<>\\\[\]]*"),
}
"""How a value that filled its pattern's cap (``_CAP`` characters) runs on: a longer token (an Azure AD
JWT with its groups) is one marker, not a marker and the rest of itself in clear. Single character
classes, so it stays linear."""


def _run_on(s: str, start: int, end: int, pattern: str) -> int:
    """Where a value matched at ``s[start:end]`` really ends: past the cap, as far as it runs on."""
    if end - start < _CAP or (rest := _REST.get(pattern)) is None or (more := rest.match(s, end)) is None:
        return end
    return more.end()


_LITERALS = (
    "-----BEGIN", "://", "earer", "Basic", "sk-", "AKIA", "ASIA", "ABIA", "ACCA", "k_live_", "k_test_", "AIza", "ya29.", "eyJ",
    "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-", "xox", "hf_", "gsk_", "xai-", "r8_", "pplx-", "tvly-", "npm_",
    "dapi", "lsv2_", "SG.", "Auth(", "csk-", "nvapi-", "jina_", "pcsk_", "fw_", "esecret_",
)  # fmt: skip
"""What every alternative of ``_BUILTIN`` but ``query``, ``pair``, ``xml`` and ``auth`` (after a separator) has
in it, as plain text."""
_NAME_PARTS = ("key", "secret", "token", "pass", "pwd", "auth", "cookie", "credential")
"""``_PAIR_PARTS`` with ``auth`` for ``authorization``: what the names of ``pair``, ``xml`` and ``auth`` have in them."""
_WIDE_SEPARATORS = ("\uff1a", "\uff1d")


def _builtin(s: str) -> re.Pattern[str]:
    """``_BUILTIN``, with ``env`` where the text has ``ENV`` in it, ``nv`` where it has a ``value``
    label, ``flag`` where it has a ``--``, ``user`` where it has ``curl`` or may run HTTPie, ``encoded``
    where it has a ``%3D`` and ``pw`` where it names a command that takes a password after ``-p`` or
    ``-a``: one more alternative tried at every position cost every text's pass ~10%."""
    return _compiled(
        ("ENV" in s, "alue" in s or "ALUE" in s, "--" in s, "curl" in s or _httpie(s), "%3D" in s or "%3d" in s, _names_pw_command(s))
    )


def _httpie(s: str) -> bool:
    return ("-a" in s or "--auth" in s) and "http" in s


def _names_pw_command(s: str) -> bool:
    return ("-p" in s or "-a" in s or "-P" in s or "-w" in s) and any(c in s for c in _PW_COMMANDS)


def _may_hold_secret(s: str) -> bool:
    """False only where ``_BUILTIN`` cannot match: a few substring tests instead of trying its ten
    alternatives at every position, ~10x faster on the texts a trace carries, almost none of which
    hold a credential."""
    if any(p in s for p in _LITERALS):
        return True
    eq = "=" in s
    if eq and ("?" in s or "&" in s or ";" in s):
        return True
    colon = ":" in s
    if colon and ((("-u" in s or "-U" in s) and "curl" in s) or _httpie(s)):
        return True
    if _names_pw_command(s):
        return True
    if ("%3D" in s or "%3d" in s) and ("%26" in s or "%3F" in s or "%3f" in s):
        return True  # a URL-encoded query or form in a value: ?next=%2Fcb%3Fcode%3D…
    if (
        not eq
        and not colon
        and "</" not in s
        and "(" not in s
        and "[" not in s
        and "--" not in s
        and "%3" not in s
        and "<-" not in s
        and "ENV" not in s
        and (s.isascii() or not any(c in s for c in _WIDE_SEPARATORS))
    ):
        return False
    low = (s if s.isascii() else s.translate(_IGNORECASE_EXTRA)).lower()
    return any(p in low for p in _NAME_PARTS)


_ESCAPE = re.compile(r"\\(?:u00(?P<hex>[2-7][0-9a-fA-F])|(?P<ws>[nrt])|/)|(?P<html>&(?:quot|#34|#x22|apos|#39|#x27);)")
"""A JSON escape of a printable ASCII character, of a line break or tab, or ``\\/``: JSON text inside
a string (an error body quoted in another, a tool call's arguments) writes ``"`` as ``\\u0022``, ``_``
may be written ``\\u005f``, and a key on a line of its own follows a ``\\n`` (read as ``nsk-…``, a
name as ``napi_key``, it was no key); and HTML's quotes (``&quot;api_key&quot;: &quot;…&quot;``, JSON
in a page or an HTML-escaped log)."""
_WHITESPACE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}
_HTML_QUOTES = {"&quot;": '"', "&#34;": '"', "&#x22;": '"', "&apos;": "'", "&#39;": "'", "&#x27;": "'"}
_ESCAPE_MARKS = ("\\u00", "\\/", "\\n", "\\r", "\\t", *_HTML_QUOTES)


class _Escaped:
    """A text read with its ``_ESCAPE`` escapes decoded, and the way back: what the scrub of the
    decoded text leaves as it was is copied from the text as written, escapes kept."""

    __slots__ = ("decoded", "escapes", "shifts", "text")

    def __init__(self, text: str) -> None:
        parts: list[str] = []
        self.text, self.escapes, self.shifts = text, [], []
        pos = length = shift = 0
        for m in _ESCAPE.finditer(text):
            if m.group("hex"):
                c = chr(int(m.group("hex"), 16))
            elif m.group("html"):
                c = _HTML_QUOTES[m.group("html")]
            else:
                c = _WHITESPACE_ESCAPES[m.group("ws")] if m.group("ws") else "/"
            if c in "\\\x7f":
                continue
            parts.append(text[pos : m.start()])
            parts.append(c)
            length += m.start() - pos
            shift += m.end() - m.start() - 1
            self.escapes.append(length)
            self.shifts.append(shift)
            length += 1
            pos = m.end()
        parts.append(text[pos:])
        self.decoded = "".join(parts)

    def at(self, i: int) -> int:
        """Where the decoded text's ``i``-th character starts in the text as written."""
        n = bisect.bisect_left(self.escapes, i)
        return i + self.shifts[n - 1] if n else i

    def written(self, start: int, end: int) -> str:
        return self.text[self.at(start) : self.at(end)]

    def rewritten(self, start: int, end: int, replacement: str) -> str:
        """``decoded[start:end]`` scrubbed into ``replacement``: its unchanged head and tail as written."""
        part = self.decoded[start:end]
        if part == replacement:
            return self.written(start, end)
        most = min(len(part), len(replacement))
        head = 0
        while head < most and part[head] == replacement[head]:
            head += 1
        tail = 0
        while tail < most - head and part[-1 - tail] == replacement[-1 - tail]:
            tail += 1
        middle = replacement[head : len(replacement) - tail]
        return self.written(start, start + head) + middle + self.written(end - tail, end)


_CACHED_LENGTH = 512
_CACHED_STRINGS = 16384
"""Bounds the caches of scrubbed texts, keys and request tags (a daemon runs for months): at most
~16 MB each, ~25 MB for tags (key, value and tag of each)."""


def _remember(cache: dict[str, Any], key: str, value: Any) -> None:
    """A bounded cache: emptied whole when full, which costs less per hit than keeping an order."""
    if len(cache) >= _CACHED_STRINGS:
        cache.clear()
    cache[key] = value


_KEY_AS_NAME = 8
"""A name this long before a separator may be a key with a credential word in it (``sk-…Key…:``)."""
_NOT_A_VALUE = frozenset({"null", "none", "true", "false", "undefined", "nil"})
_TYPE_NAMES = frozenset({"str", "&str", "string", "bytes", "int", "bool", "secretstr", "secretbytes", "optional", "any", "object"})
"""A type after a name and ``:`` (a parameter, a field), never a credential."""
_CODE_PATH = re.compile(r"[A-Za-z_$][A-Za-z0-9_$.:]{0,4095}")
_READ_OPENERS = ('("', "('", '["', "['", "()", '(\\"', '[\\"')
_ENV_READS = ("process.env.", "import.meta.env.", "os.environ/")
"""What code that reads a key puts after its name: a qualified call or subscript of a quoted name
(``os.environ["OPENAI_API_KEY"]``, ``os.getenv("…")``, ``System.getenv("…")``, ``env::var("…")``),
Node's environment, or LiteLLM's own ``api_key: os.environ/AZURE_API_KEY``; the name it reads is no
value, and stays readable."""
_ENV_READ = re.compile(r"(?:os\.environ/|process\.env\.|import\.meta\.env\.)[A-Za-z_][A-Za-z0-9_]{0,127}")
"""One of ``_ENV_READS`` as a whole value (``{"api_key": "os.environ/AZURE_API_KEY"}``, a LiteLLM config as data)."""
_TUPLE = object()
"""On :meth:`Scrubber.value`'s stack: the list below it, now filled, becomes a tuple."""


def _reads_a_key(s: str, start: int, end: int) -> bool:
    """Whether the word ``s[start:end]`` after a credential name is code reading one, not a value."""
    if s.startswith(_ENV_READS, start):
        return True
    return (
        s.startswith(_READ_OPENERS, end)
        and _CODE_PATH.fullmatch(s, start, end) is not None
        and ("." in s[start:end] or "::" in s[start:end])
    )


_PAIR_END = re.compile(r"\\{0,3}[\"'][ \t]{0,16}[)\]]")
"""What closes a name and its value as a pair: ``("x-api-key", "…")``, ``["token", "…"]``."""
_PW_COMMANDS = ("mysql", "mariadb", "sshpass", "redis-cli", "login", "sqlcmd", "ldap", "mongo")
_PW_COMMAND = re.compile(
    r"(?<![\w.-])(?:mysql(?:dump|admin)?|mariadb(?:-dump|-admin)?|sshpass|redis-cli|(?:docker|podman|nerdctl)[ \t]+login"
    r"|sqlcmd|ldap(?:search|add|modify|delete|whoami|passwd)|mongo(?:sh|dump|restore|import|export)?)(?![\w.-])"
)
_PW_OPTION = {"redis-cli": "a", "sqlcmd": "P"}
"""The option each command takes its password after, where it is not ``-p`` (``ldap…``: ``-w``)."""
_COMMAND_BREAKS = (";", "|", "&", "(", "`")
"""Where one command of a shell line ends and the next begins (``mysql …; docker run -p8080:80``)."""
_HTTPIE = re.compile(r"(?<![\w./-])(?:https?|httpie)[ \t]")
"""HTTPie's command (``http -a user:password example.org``), not a URL's scheme."""
_CURL_REACH = 1024
"""How far before ``-u user:password`` a ``curl`` is looked for: docker's ``-u 1000:1000`` is a user and a group."""
_FLAG_WORDS = frozenset(
    {"flag", "flags", "option", "options", "argument", "arguments", "arg", "args", "parameter", "param", "switch", "value"}
)
"""After a flag, words about it: ``the --token option``."""
_WORD_GAP = re.compile(r"[ +]")
_ENV_REFERENCE = re.compile(
    r"(?:\$\{[A-Za-z_][A-Za-z0-9_]{0,127}\}|\$[A-Z][A-Z0-9]{0,63}_[A-Z0-9_]{1,64}|%[A-Z][A-Z0-9]{0,63}_[A-Z0-9_]{1,64}%)"
    r"(?=[\s\"'`,;)\]}]|\Z)"
)
"""A variable named as the value (``OPENAI_API_KEY=${OPENAI_API_KEY}`` in a compose file, ``api_key:
$OPENAI_API_KEY``, Windows' ``%DB_PASSWORD%``): no value. Bare ``$name`` only in an environment
variable's upper case with an ``_``: a password may start with ``$``."""
_SHELL_REFERENCE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]{0,127}\}?")
"""A shell variable that holds the secret (``--api-key "$OPENAI_API_KEY"``, ``--password $clientSecret``): no
value, unless single quotes make it literal."""


def _names_no_value(value: str) -> bool:
    """Whether the second string of a pair is another name, not a value: a list of names
    (``["api_key", "api_base"]``, ``("Authorization", "Content-Type")``, ``("password", "token")``), or
    punctuation (botocore's ``('CreateOAuth2Token', '_')``)."""
    words = value.replace("-", "_").split("_")
    return (
        (len(words) > 1 and value.isascii() and all(w.isalpha() for w in words))
        or not any(c.isalnum() for c in value)
        or name_kind(value) != _NOT_SECRET
    )


def _flag_word(value: str) -> bool:
    """Whether the word after a command-line flag is no value: the next flag, a placeholder (``--token
    TOKEN``, ``--api-key $OPENAI_API_KEY``), or prose about the flag (``the --token flag``)."""
    low = value.lower()
    return (
        value[:1] == "-"
        or low in _FLAG_WORDS
        or _prose([low])
        or (value.isupper() and value.replace("_", "").isalpha())
        or _SHELL_REFERENCE.fullmatch(value) is not None
    )


def _looks_random(token: str) -> bool:
    """A token, not a word: letters with digits, or capitals after the first letter."""
    has_digit = any(c.isdigit() for c in token)
    has_alpha = any(c.isalpha() for c in token)
    return (has_digit and has_alpha) or any(c.isupper() for c in token[1:]) or token.endswith("=")


class Scrubber:
    """Replaces credentials in strings, JSON-like values and built spans with a fingerprint marker.

    ``patterns`` add regexes whose match (or first group, if they have one) is a secret too;
    ``content=False`` leaves prompts and completions verbatim (a team that wants its data as sent),
    while parameters, tags, errors and ids are still scrubbed.
    """

    def __init__(self, patterns: Iterable[str | re.Pattern[str]] = (), content: bool = True, salt: str | None = None) -> None:
        self.extra = tuple(re.compile(p) if isinstance(p, str) else p for p in patterns)
        self.content = content
        self.salt = salt if salt is not None else os.environ.get(SALT_ENV) or DEFAULT_SALT
        self._mac = hmac.new(self.salt.encode("utf-8", "surrogatepass"), digestmod=hashlib.sha256)
        self._fingerprints: dict[str, str] = {}
        self._texts: dict[str, str] = {}
        self._keys: dict[str, tuple[str, int]] = {}
        self._tags: dict[str, tuple[str, str, str]] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        """The same scrubber in a backfill worker (same patterns, same salt, so the same markers)."""
        return (type(self), (self.extra, self.content, self.salt))

    # --- strings ----------------------------------------------------------------------------------

    def marker(self, secret: str) -> str:
        """``[REDACTED:<first 8 hex of HMAC-SHA256(salt, secret)>]``."""
        fp = self._fingerprints.get(secret)
        if fp is None:
            mac = self._mac.copy()
            mac.update(secret.encode("utf-8", "surrogatepass"))
            fp = mac.hexdigest()[:8]
            if len(self._fingerprints) > 65536:
                self._fingerprints.clear()
            self._fingerprints[secret] = fp
        return f"[REDACTED:{fp}]"

    def text(self, s: str) -> str:
        """Every credential found in free text, by shape or by its name, replaced. Short strings
        (dict keys, ids, model names: most of a trace's strings, and the same ones trace after
        trace) are remembered."""
        short = len(s) <= _CACHED_LENGTH
        if short and (done := self._texts.get(s)) is not None:
            return done
        try:
            out = s
            escaped = _Escaped(s) if ("\\" in s or "&" in s) and any(e in s for e in _ESCAPE_MARKS) else None
            if escaped is not None and escaped.escapes:
                d = escaped.decoded
                if _may_hold_secret(d) and _builtin(d).search(d) is not None:
                    out = self._sub(d, 0, escaped)
            elif _may_hold_secret(out) and _builtin(out).search(out) is not None:
                out = self._sub(out, 0)
            for pattern in self.extra:
                if pattern.search(out) is not None:
                    out = self._extra(pattern, out)
        except Exception:
            out = self.marker(_safe_str(s))
        if short:
            _remember(self._texts, s, out)
        return out

    def tag(self, tag: str) -> tuple[str, str, str]:
        """(key, value, tag) of a ``k:v`` request tag: scrubbed whole before it is split (a URL's
        password sits past a colon), then its value by its key's name (``API Key: ...``), as a dict's.
        Remembered: a call's tags are read for its span and for its trace's tags, and the same few
        come call after call."""
        done = self._tags.get(tag)
        if done is not None:
            return done
        text = self.text(tag)
        k, v = _split_tag(text)
        kept = self.field(k, v)
        done = (k, kept, text if kept == v else f"{k}:{kept}")
        if len(tag) <= _CACHED_LENGTH:
            _remember(self._tags, tag, done)
        return done

    def secret(self, value: str) -> str:
        """A value known to be a credential (by its name): a leading auth scheme stays visible, and
        the fingerprint is the credential's own, as for the same key found bare elsewhere."""
        v = value.strip()
        if not MARKER.sub("", v).strip(" ,;") or _ENV_REFERENCE.fullmatch(v) or _ENV_READ.fullmatch(v):
            return value
        m = _SCHEME.match(value)
        if m and m.group("scheme") and (rest := value[m.end() :].strip()):
            return m.group("scheme") + (rest if MARKER.fullmatch(rest) else self.marker(rest))
        return self.marker(v)

    def field(self, name: str, value: Any) -> Any:
        """``value`` as it sits under ``name`` (a dict key, a tag key)."""
        kind = name_kind(name) if type(name) is str else _NOT_SECRET
        if kind == _SECRET:
            return self._secret_value(value)
        if kind == _HASH and type(value) is str:
            return self._hash(value)
        return self.value(value)

    def _hash(self, value: str) -> str:
        """A key's hash is kept, anything else under its name is taken for the key."""
        v = value.strip()
        if not v or v in _KEY_LABELS or _HEX.fullmatch(v) or MARKER.fullmatch(v):
            return value
        m = _SCHEME.match(v)
        return self.marker((v[m.end() :].strip() if m else "") or v)

    def _sub(self, s: str, level: int, escaped: _Escaped | None = None) -> str:
        """``_BUILTIN.sub``, but a name's value may run past its match (to a closing quote, a line's end).
        ``escaped``: ``s`` is its decoded text, and what is not replaced is copied as written."""
        out: list[str] = []
        pos = 0
        builtin = _builtin(s)
        while (m := builtin.search(s, pos)) is not None:
            replacement, end = self._replace(m, level)
            if escaped is None:
                out.append(s[pos : m.start()])
                out.append(replacement)
            else:
                out.append(escaped.written(pos, m.start()))
                out.append(escaped.rewritten(m.start(), end, replacement))
            pos = end
        out.append(s[pos:] if escaped is None else escaped.written(pos, len(s)))
        return "".join(out)

    def _replace(self, m: re.Match[str], level: int) -> tuple[str, int]:
        kind = m.lastgroup
        whole = m.group(0)
        if kind == "env" and m.string[m.string.rfind("\n", 0, m.start()) + 1 : m.start()].strip(" \t"):
            return whole[:3], m.start() + 3  # ENV not at a line's start: no Dockerfile's
        if kind == "user":
            return self._user(m, level)
        if kind == "pw":
            return self._pw(m)
        if kind == "pair" or kind == "call" or kind == "env" or kind == "nv" or kind == "flag":
            out, end = self._pair(m, kind)
            if kind == "call" and whole[0] in "([" and (_PAIR_END.match(m.string, end) is None or _names_no_value(m.string[m.end() : end])):
                out, end = whole, m.end()  # a bracket's strings, not one name and its value: ("api_key", "model", …)
            group = kind + "_n"
            a, b = m.span(group)
            a, b = a - m.start(), b - m.start()
            if b - a >= _KEY_AS_NAME and out[a:b] == whole[a:b] and (name := self.text(whole[a:b])) != whole[a:b]:
                out = out[:a] + name + out[b:]  # a key that reads as a name (``sk-…PWD…:``): its shape still counts
            if kind == "pair" and end == m.end() and out == whole and (gap := _WORD_GAP.search(m.group("pair_n"))) is not None:
                cut = m.start("pair_n") - m.start() + gap.end()
                if _NV.match(m.string, m.start() + cut):
                    return whole[:cut], m.start() + cut  # its second word starts a name and value: add key="ApiKey" value="…"
            return out, end
        if kind == "xml":
            start, end = m.start("xml_v") - m.start(), m.end("xml_v") - m.start()
            if name_kind(m.group("xml_n")) != _SECRET:
                return whole[:start], m.start("xml_v")
            return whole[:start] + self.secret(m.group("xml_v")) + whole[end:], m.end()
        if kind == "userinfo":
            user, value = m.group("userinfo_u"), m.group("userinfo_v")
            user = self._sub(user, level + 1) if level < 4 else user
            return f"{user}:{value if MARKER.fullmatch(value) else self.marker(value)}", m.end()
        if kind in _VALUE_GROUPS:
            group = next(g for g in _VALUE_GROUPS[kind] if m.group(g) is not None)
            value = m.group(group)
            if MARKER.fullmatch(value) or (kind == "bearer" and not _looks_random(value)):
                return whole, m.end()
            end = _run_on(m.string, m.start(group), m.end(group), group)
            return whole[: m.start(group) - m.start()] + self.marker(m.string[m.start(group) : end]), end
        if kind == "sk" and not any(c.isdigit() or c.isupper() for c in whole[3:]):
            return whole, m.end()
        return self.marker(whole), m.end()

    def _user(self, m: re.Match[str], level: int) -> tuple[str, int]:
        """curl's ``-u user:password`` (``--user``, ``-U``/``--proxy-user``), HTTPie's ``-a``/``--auth``:
        the password, the user scrubbed as text (Stripe's ``-u sk_test_…:``). Elsewhere (docker's
        ``-u 1000:1000``) scanned on."""
        s, start = m.string, m.start()
        value = m.group("user_v")
        literal = (m.group("user_q") or "").endswith("'")
        httpie = m.group("user_o") == "-a" or m.group("user_l") == "auth"
        if (
            (
                _HTTPIE.search(s, max(0, start - _CURL_REACH), start) is None
                if httpie
                else s.rfind("curl", max(0, start - _CURL_REACH), start) < 0
            )
            or MARKER.fullmatch(value)
            or (not literal and _SHELL_REFERENCE.fullmatch(value))
        ):
            return s[start : start + 2], start + 2
        user = m.group("user_u")
        user = self._sub(user, level + 1) if level < 4 and user else user
        return s[start : m.start("user_u")] + user + ":" + self.marker(value), m.end()

    def _pw(self, m: re.Match[str]) -> tuple[str, int]:
        """A password given to a command line as its option's value: MySQL's and MariaDB's
        ``-p<password>`` (joined: ``-p db`` asks for it and names a database), ``sshpass -p``,
        ``docker login -p``, ``mongosh -p``, ``redis-cli -a``, ``sqlcmd -P``, ``ldapsearch -w``. The
        command is the last one named before it in its command of the line; any other's ``-p``
        (``docker run -p 8080:80``, ``mkdir -p``) is scanned on."""
        s, start = m.string, m.start()
        line = s[max(s.rfind("\n", 0, start) + 1, start - _CURL_REACH) : start]
        this = line[max(line.rfind(c) for c in _COMMAND_BREAKS) + 1 :]
        named = any(c in this for c in _PW_COMMANDS)
        command = next(reversed([c.group(0) for c in _PW_COMMAND.finditer(this)]), None) if named else None
        option, joined, value = m.group("pw_o"), m.group("pw_sp") is None, m.group("pw_v")
        mysql = command is not None and command.startswith(("mysql", "mariadb"))
        wants = None if command is None else "w" if command.startswith("ldap") else _PW_OPTION.get(command, "p")
        takes = option == wants and (joined or not mysql)
        literal = (m.group("pw_q") or "").endswith("'")
        if not takes or MARKER.fullmatch(value) or (not literal and _SHELL_REFERENCE.fullmatch(value)):
            return s[start : start + 2], start + 2
        return s[start : m.start("pw_v")] + self.marker(value), m.end()

    def _pair(self, m: re.Match[str], kind: str = "pair") -> tuple[str, int]:
        """A value under a name: up to its closing quote if the separator opened one, the rest of the
        line for a header, words to the line's end for a password after ``:``, else one word; after a
        ``:`` that ends its line, on the next line when it is alone there. After ``:``, common words are
        prose, not a value. What follows another name is scanned on from the separator. ``kind``
        ``call``: the name and its value are a setter's arguments (``os.putenv("NAME", "…")``,
        ``props.put("api.key", "…")``); ``env``: a Dockerfile's legacy ``ENV NAME value``, its value
        the rest of the line; ``flag``: a command line's ``--api-key …``, its value the next shell word."""
        n_group, sep_group, q_group = kind + "_n", kind + "_sep", kind + "_q"
        env, flag = kind == "env", kind == "flag"
        name = m.group(n_group)
        kind = name_kind(name)
        s, start = m.string, m.end()
        if kind == _NOT_SECRET:
            return m.group(0), start
        if (done := MARKER.match(s, start)) is not None:
            return s[m.start() : done.end()], done.end()
        quote = m.group(q_group)
        n = _normalized(name)
        colon = m.group(sep_group).rstrip(_GAP_CHARS).endswith((":", "\uff1a"))
        pos, next_line = start, False
        if not quote and colon and (nl := _NEXT_LINE.match(s, start)) is not None:
            pos, next_line = nl.end(), True
            if (done := MARKER.match(s, pos)) is not None:
                return s[m.start() : done.end()], done.end()
            if s[pos : pos + 1] in ("'", '"'):
                quote, pos = s[pos], pos + 1
        if quote:
            quote = quote.lstrip("[" + _GAP_CHARS).lstrip("bBuUrRfF")  # a list's first ("X-Api-Key":["…"]), a Python literal (b'…')
            v = _QUOTED["\\" if len(quote) > 1 else quote].match(s, pos)
        elif env or (not flag and (n in _HEADER_NAMES or n.endswith(("_cookie", "_authorization")))):
            v = _LINE.match(s, pos)
        else:
            v = _VALUE.match(s, pos)
        if v is None:
            return m.group(0), start
        value_start, end = v.span("v") if v.re is _VALUE else v.span()
        end = _run_on(s, value_start, end, v.re.pattern)
        if v.re is _VALUE and _reads_a_key(s, value_start, end):
            return s[m.start() : value_start], value_start  # scanned on: os.getenv("NAME", "<a key as its default>")
        if v.re is _VALUE and colon and n.endswith(_PHRASE_NAMES):
            while (w := _WORD.match(s, end)) is not None and w.end() - value_start <= 4096:
                end = w.end()
        value = s[value_start:end]
        if quote == "`" and "${" in value:
            return m.group(0), start  # a template literal that reads its value: `Bearer ${token}`
        if v.re is _VALUE:
            value = value.rstrip(";:" if "==" in m.group(sep_group) else ";")  # if token == None:
        elif v.re is _LINE:
            value = value.rstrip()
        end = value_start + len(value)
        if not quote and (colon or env):
            words = value.lower().split(None, 3)[:3] or [""]
            if _prose(words) or (next_line and (words[0].endswith((":", "\uff1a")) or words[0][:1] == "#" or words[0] == "-")):
                return m.group(0), start
            if next_line and _LINE_END.match(s, end) is None:
                return m.group(0), start
        if not value or value.lower() in _NOT_A_VALUE:
            return s[m.start() : end], end
        if (ref := _ENV_REFERENCE.match(s, value_start)) is not None:
            return s[m.start() : ref.end()], ref.end()
        if flag and (n.startswith("no_") or (quote != "'" and _SHELL_REFERENCE.fullmatch(value) if quote else _flag_word(value))):
            return m.group(0), start  # --no-password, --api-key "$KEY", --api-key YOUR_KEY, the --token flag
        if colon and v.re is _VALUE and value.lower() in _TYPE_NAMES:
            return m.group(0), start  # a parameter's or a field's type: def f(token: str), password: String
        return s[m.start() : value_start] + (self._hash(value) if kind == _HASH else self.secret(value)), end

    def _extra(self, pattern: re.Pattern[str], s: str) -> str:
        """An added pattern's matches, except where it would match (part of) a marker."""
        markers = [(m.start(), m.end()) for m in MARKER.finditer(s)] if "[REDACTED:" in s else []

        def replace(m: re.Match[str]) -> str:
            group = 1 if pattern.groups and m.group(1) is not None else 0
            start, end = m.span(group)
            if start == end or any(a < end and start < b for a, b in markers):
                return m.group(0)
            return s[m.start() : start] + self.marker(m.group(group)) + s[end : m.end()]

        return pattern.sub(replace, s)

    # --- values -----------------------------------------------------------------------------------

    def value(self, value: Any) -> Any:
        """A JSON-like value, scrubbed (dict keys too) into a new one; what is not text is kept. Walked
        with a stack, not recursion, so a dict's rules hold at any depth; a container met twice (or
        inside itself) is scrubbed once."""
        t = type(value)
        if t is str:
            done = self._texts.get(value)
            return done if done is not None else self.text(value)
        if not (t is dict or t is list or t is tuple):
            return value
        root: list[Any] = [None]
        stack: list[tuple[Any, Any, Any]] = [(value, root, 0)]
        memo: dict[int, Any] = {}
        while stack:
            src, dst, slot = stack.pop()
            if src is _TUPLE:
                dst[slot] = tuple(dst[slot])
                continue
            t = type(src)
            if t is tuple:
                stack.append((_TUPLE, dst, slot))
            elif (done := memo.get(id(src))) is not None:
                dst[slot] = done
                continue
            out = self._items(src, stack) if t is dict else self._list(src, stack)
            dst[slot] = out
            if t is not tuple:
                memo[id(src)] = out
        return root[0]

    def _list(self, values: list[Any] | tuple[Any, ...], stack: list[tuple[Any, Any, Any]]) -> list[Any]:
        """Its strings scrubbed now, its containers pushed on ``stack`` for :meth:`value` (a tuple's
        list becomes a tuple once they are done)."""
        texts = self._texts
        items: list[Any] = []
        for i, x in enumerate(values):
            t = type(x)
            if t is str:
                done = texts.get(x)
                items.append(done if done is not None else self.text(x))
            elif t is dict or t is list or t is tuple:
                items.append(None)
                stack.append((x, items, i))
            else:
                items.append(x)
        return items

    def _items(
        self,
        d: dict[Any, Any],
        stack: list[tuple[Any, Any, Any]] | None = None,
        verbatim: frozenset[str] = frozenset(),
        shared: dict[int, tuple[Any, Any]] | None = None,
        own_keys: bool = False,
    ) -> dict[Any, Any]:
        """The hot loop (a trace has a few hundred values): one cached lookup per key gives its
        scrubbed text and what its name says, one per short text value its result. Containers are
        pushed on ``stack`` for :meth:`value`, or without one scrubbed whole here. ``shared``: the
        containers already scrubbed among a span's attributes, by identity (a span's outputs and its
        ``raw_llm_response`` are one object, an attempt's inputs are the root's too), with the
        original kept so its id stays its own. ``own_keys``: the keys are ours or MLflow's (a span's
        attributes, an event's), kept as they are whatever a ``--scrub-pattern`` matches."""
        texts, keys = self._texts, self._keys
        logprob = "logprob" in d
        label = _secret_label(d) if "value" in d else None
        out: dict[Any, Any] = {}
        for k, v in d.items():
            if label is not None and k == "value" and k not in verbatim:
                out[k] = self.field(label, v)
                continue
            if type(k) is str:
                entry = keys.get(k)
                if entry is None:
                    entry = self._key(k)
                key, kind = (k, entry[1]) if own_keys else entry
            else:
                key, kind = k, _NOT_SECRET
            if kind != _NOT_SECRET and not (logprob and k == "token"):
                out[key] = v if k in verbatim else self.field(k, v)
                continue
            t = type(v)
            if t is str:
                done = texts.get(v)
                out[key] = v if k in verbatim else done if done is not None else self.text(v)
            elif t is dict or t is list or t is tuple:
                if k in verbatim:
                    out[key] = v
                elif stack is not None:
                    out[key] = None
                    stack.append((v, out, key))
                elif shared is None:
                    out[key] = self.value(v)
                elif (seen := shared.get(id(v))) is not None:
                    out[key] = seen[1]
                else:
                    out[key] = self.value(v)
                    shared[id(v)] = (v, out[key])
            else:
                out[key] = v
        return out

    def _key(self, k: str) -> tuple[str, int]:
        entry = (self.text(k), name_kind(k))
        if len(k) <= _CACHED_LENGTH:
            _remember(self._keys, k, entry)
        return entry

    def _field_at(self, name: str, value: Any) -> Any:
        if name_kind(name) == _NOT_SECRET:
            return self.value(value)
        return self.field(name, value)

    def _secret_value(self, value: Any) -> Any:
        t = type(value)
        if t is str:
            return self.secret(value)
        if t is dict or t is list or t is tuple:
            return self.marker(_json_text(value)) if value else value
        return value

    # --- spans ------------------------------------------------------------------------------------

    def spans(self, spans: Iterable[Any]) -> None:
        """Scrub built spans in place: attribute and event values, status messages. Their names and
        keys are ours or MLflow's (the name's call type was scrubbed as it was built): a
        ``--scrub-pattern`` that matched ``token`` or ``session`` cost every trace its token counts
        or its session, and one matching ``a`` nearly every key."""
        shared: dict[int, tuple[Any, Any]] = {}
        for span in spans:
            span.attributes = self._attributes(span.attributes, shared)
            span.events = [(name, t, self._items(attrs, own_keys=True)) for name, t, attrs in span.events]
            if span.error is not None:
                span.error = self.text(span.error)

    def _attributes(self, attrs: dict[str, Any], shared: dict[int, tuple[Any, Any]]) -> dict[str, Any]:
        if self.content:
            return self._items(attrs, shared=shared, verbatim=OWN_VALUES, own_keys=True)
        out: dict[str, Any] = {}
        for k, v in attrs.items():
            if k in (SpanAttributeKey.OUTPUTS, "raw_llm_response") or k in OWN_VALUES:
                out[k] = v
            elif k == SpanAttributeKey.INPUTS and type(v) is dict:
                out[k] = self._items(v, verbatim=CONTENT_KEYS)
            else:
                out[k] = self._field_at(k, v)
        return out


_TAG_SPLIT = re.compile(rf"{MARKER.pattern}|:")


def _secret_label(d: dict[Any, Any]) -> str | None:
    """The credential name a name/value pair gives its ``value`` (HAR's and Kubernetes' ``{"name": "X-Api-Key",
    "value": "…"}``, Postman's ``key``), or None: the value sits under that name, not under ``value``."""
    label = d.get("name", d.get("key"))
    return label if type(label) is str and name_kind(label) == _SECRET else None


def _split_tag(tag: str) -> tuple[str, str]:
    """``k:v`` at the first colon that is not inside a scrubbing marker."""
    for m in _TAG_SPLIT.finditer(tag):
        if m.group(0) == ":":
            return tag[: m.start()].strip(), tag[m.end() :].strip()
    return tag.strip(), ""


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except Exception:
        return _safe_str(value)


def _safe_str(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return type(value).__name__


def default_scrubber() -> Scrubber:
    """The scrubber every run uses unless told otherwise: one per salt in ``LITELLM_INGEST_SCRUB_SALT``
    (read at each call), so its caches are shared."""
    return _scrubber_for(os.environ.get(SALT_ENV))


@functools.lru_cache(maxsize=16)
def _scrubber_for(salt: str | None) -> Scrubber:
    return Scrubber(salt=salt)
