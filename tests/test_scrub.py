"""The credential scrubber on its own: every name and shape it promises, what it must leave alone,
its marker and fingerprint, and (Hypothesis) that it never raises, is idempotent, and lets no
planted key through, whatever the JSON around it."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import string
import time
from typing import Any

import pytest
from conftest import read_capture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.scrub import DEFAULT_SALT, MARKER, SALT_ENV, Scrubber

S = Scrubber(salt=DEFAULT_SALT)


def rand(n: int = 24, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def key() -> str:
    """A fresh LiteLLM-style virtual key (sk- + 22 url-safe characters, at least one digit)."""
    return f"sk-{rand(21)}7"


def fingerprint(secret: str, salt: str = DEFAULT_SALT) -> str:
    """Computed here, independently of the scrubber: HMAC-SHA256(salt, secret), first 8 hex digits."""
    return f"[REDACTED:{hmac.new(salt.encode(), secret.encode(), hashlib.sha256).hexdigest()[:8]}]"


# --- names --------------------------------------------------------------------------------------

SECRET_NAMES = [
    "api_key", "apikey", "API-Key", "apiKey", "Authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key",
    "token", "access_token", "refresh_token", "id_token", "session_token", "secret", "client_secret", "aws_secret_key",
    "aws_secret_access_key", "aws_session_token", "password", "passwd", "cookie", "Set-Cookie", "private_key", "vertex_credentials",
    "OPENAI_API_KEY", "x-litellm-api-key", "Ocp-Apim-Subscription-Key", "mlflow.traceTag.api_key", "credentials",
    "pwd", "PGPASSWORD", "dbPassword", "MYSQL_PWD",
]  # fmt: skip
NOT_SECRET_NAMES = [
    "max_tokens", "prompt_tokens", "total_tokens", "completion_tokens", "maxTokens", "cache_key", "tokenizer", "eos_token",
    "api_base", "api_version", "key", "user_api_key_alias", "token_type", "model", "password_reset_url",
]  # fmt: skip


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_a_value_under_a_credential_name_becomes_its_marker(name: str) -> None:
    secret = rand(12, string.ascii_lowercase)  # no shape at all: only the name gives it away
    out = S.value({name: secret, "nested": [{name: secret}]})
    assert out[name] == fingerprint(secret)
    assert out["nested"][0][name] == fingerprint(secret)


@pytest.mark.parametrize("name", NOT_SECRET_NAMES)
def test_a_value_under_an_ordinary_name_is_kept(name: str) -> None:
    value = {"n": 1024, "s": "hello world"}
    for v in (4096, "cl100k_base", "plain words here", value):
        assert S.value({name: v}) == {name: v}


def test_a_credential_name_keeps_the_auth_scheme_and_fingerprints_the_key_itself() -> None:
    k = key()
    out = S.value({"extra_headers": {"Authorization": f"Bearer {k}", "X-Other": "1"}})
    assert out == {"extra_headers": {"Authorization": f"Bearer {fingerprint(k)}", "X-Other": "1"}}


def test_structured_credentials_become_one_marker() -> None:
    creds = {"type": "service_account", "private_key_id": rand(), "client_email": "x@y.iam"}
    out = S.value({"vertex_credentials": creds, "vertex_project": "p"})
    assert MARKER.fullmatch(out["vertex_credentials"]) and out["vertex_project"] == "p"


def test_logprob_tokens_are_text_not_credentials() -> None:
    logprobs = {"content": [{"token": "Hello", "logprob": -0.1, "top_logprobs": [{"token": " world", "logprob": -2.0}]}]}
    assert S.value(logprobs) == logprobs


def test_numbers_and_nulls_under_credential_names_are_kept() -> None:
    value = {"api_key": None, "token": 3, "password": "", "secret": True}
    assert S.value(value) == value


# --- the key hash -------------------------------------------------------------------------------


def test_a_sha256_hex_under_user_api_key_hash_is_kept_and_anything_else_is_its_marker() -> None:
    h = hashlib.sha256(b"k").hexdigest()
    k = key()
    assert S.field("user_api_key_hash", h) == h
    assert S.field("user_api_key_hash", "litellm_proxy_master_key") == "litellm_proxy_master_key"
    for raw in (k, f"Bearer {k}", f" {k}"):
        assert S.field("user_api_key_hash", raw) == fingerprint(k), raw
    assert S.field("user_api_key_hash", "opaque-not-hex") == fingerprint("opaque-not-hex")


# --- shapes -------------------------------------------------------------------------------------

SHAPES = {
    "openai": lambda: f"sk-proj-{rand(40)}",
    "anthropic": lambda: f"sk-ant-api03-{rand(40)}",
    "openrouter": lambda: f"sk-or-v1-{rand(48, '0123456789abcdef')}",
    "litellm virtual key": key,
    "aws access key": lambda: "AKIA" + rand(16, string.ascii_uppercase + string.digits),
    "aws session key": lambda: "ASIA" + rand(16, string.ascii_uppercase + string.digits),
    "google": lambda: "AIza" + rand(35),
    "jwt": lambda: f"eyJ{rand(20)}.eyJ{rand(40)}.{rand(30)}",
    "github": lambda: f"ghp_{rand(36)}",
    "github pat": lambda: f"github_pat_{rand(60)}",
    "slack": lambda: f"xoxb-{rand(12, string.digits)}-{rand(24)}",
    "hugging face": lambda: f"hf_{rand(34)}",
    "groq": lambda: f"gsk_{rand(52)}",
    "xai": lambda: f"xai-{rand(60)}",
    "stripe": lambda: f"sk_live_{rand(24)}",
    "stripe restricted": lambda: f"rk_live_{rand(24)}",
    "cerebras": lambda: f"csk-{rand(48, string.ascii_lowercase + string.digits)}",
    "nvidia": lambda: f"nvapi-{rand(64)}",
    "jina": lambda: f"jina_{rand(60, string.ascii_letters + string.digits)}",
    "pinecone": lambda: f"pcsk_{rand(6)}_{rand(60)}",
    "fireworks": lambda: f"fw_{rand(24, string.ascii_letters + string.digits)}",
    "anyscale": lambda: f"esecret_{rand(24)}",
    "pem": lambda: f"-----BEGIN RSA PRIVATE KEY-----\nMIIE{rand(60)}\n{rand(60)}==\n-----END RSA PRIVATE KEY-----",
    "pem in json text": lambda: f"-----BEGIN PRIVATE KEY-----\\nMIIE{rand(60)}\\n{rand(40)}\\n-----END PRIVATE KEY-----",
}


@pytest.mark.parametrize("kind", list(SHAPES))
def test_a_credential_shape_inside_any_text_becomes_its_marker(kind: str) -> None:
    """A secret in JSON text is fingerprinted as itself, its escapes read (``\\n`` a line break): the
    same key found unescaped elsewhere gives the same marker."""
    secret = SHAPES[kind]()
    for text in (secret, f"upstream said: {secret}.", f"('{secret}')", f'{{"k": "{secret}"}}'):
        out = S.text(text)
        assert secret not in out and fingerprint(secret.replace("\\n", "\n")) in out, (text, out)


def test_the_docs_master_key_is_a_key_and_prose_is_not() -> None:
    assert S.text("use sk-1234 as the master key") == f"use {fingerprint('sk-1234')} as the master key"
    for prose in ("pip install sk-learn", "a task-1234 ticket", "the risk-2 level", "sk-image filters"):
        assert S.text(prose) == prose
    identifiers = ("fw_version_of_the_board_firmware", "jina_embeddings_v2_base_en_and_more", "pcsk_rotation_is_monthly_for_each")
    for prose in (*identifiers, "model: jina-embeddings-v3", "mask_" + "ab" * 24, "task_" + "0" * 48):
        assert S.text(prose) == prose


def test_bearer_and_basic_tokens_keep_their_scheme() -> None:
    opaque = rand(32)
    assert S.text(f"Authorization: Bearer {opaque}") == f"Authorization: Bearer {fingerprint(opaque)}"
    assert S.text("got header bearer " + opaque) == "got header bearer " + fingerprint(opaque)
    assert S.text("Basic dXNlcjpwYXNz") == f"Basic {fingerprint('dXNlcjpwYXNz')}"
    for prose in ("Basic authentication is off", "the Bearer of news", "basic python3 usage"):
        assert S.text(prose) == prose


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("https://generativelanguage.googleapis.com/v1beta/models/gemini-pro:generateContent?key={s}&alt=sse", "x"),
        ("https://api.example.com/v1?api_key={s}", "x"),
        ("https://api.example.com/v1?alt=1&access_token={s}#frag", "x"),
        ("https://bucket.s3.amazonaws.com/o?X-Amz-Signature={s}&X-Amz-Expires=60", "x"),
        ("https://a.blob.core.windows.net/c/b?sv=2021&sig={s}", "x"),
        ("https://oauth.example.com/cb?code={s}&state=1", "x"),
        ("postgresql://admin:{s}@db.internal:5432/litellm", "x"),
        ("redis://:{s}@cache:6379/0", "x"),
    ],
)
def test_url_passwords_and_query_credentials_become_markers(url: str, secret: str) -> None:
    secret = rand(20, string.ascii_lowercase)
    out = S.text(url.format(s=secret))
    assert secret not in out and fingerprint(secret) in out, out
    assert out.split(fingerprint(secret))[0] == url.split("{s}")[0]


def test_ordinary_urls_are_untouched() -> None:
    for url in (
        "https://api.openai.com/v1/chat/completions",
        "https://myres.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-02-01",
        "http://127.0.0.1:4000/v1?model=gpt-4o&stream=true",
        "https://host:8443/path/to@file",
    ):
        assert S.text(url) == url


@pytest.mark.parametrize(
    "template",
    [
        "litellm.AuthenticationError: {{'api_key': '{s}', 'model': 'gpt-4o'}}",
        "call(api_key={s}, max_tokens=10)",
        'body={{"api_key": "{s}"}}',
        'escaped {{\\"password\\": \\"{s}\\"}}',
        "OPENAI_API_KEY={s} python app.py",
        "AWS_SECRET_ACCESS_KEY={s}",
        "client_secret: {s}",
        "Cookie: session={s}",
        "x-api-key: {s}",
    ],
)
def test_credential_names_inside_free_text_give_their_values_away(template: str) -> None:
    secret = rand(18, string.ascii_lowercase)
    out = S.text(template.format(s=secret))
    assert secret not in out and MARKER.search(out), out


@pytest.mark.parametrize(
    "template",
    [
        'httpx.HTTPStatusError: 401 body={{"error":"invalid_grant","accessToken":"{s}"}}',
        "AzureException - token request failed: {{'clientSecret': '{s}'}}",
        "refreshToken={s}",
        '{{"apiToken": "{s}"}}',
        "aws_config: secretAccessKey={s}",
        "x.authToken: {s}",
    ],
)
def test_camel_case_credential_names_in_text_are_credential_names(template: str) -> None:
    """As dict keys they were split and found; in text the whole identifier is weighed the same way."""
    secret = rand(18, string.ascii_lowercase)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


@pytest.mark.parametrize("template", ["API Key: {s}", "secret key:{s}", "api+key:{s}", "litellm.AuthenticationError: Invalid API Key: {s}"])
def test_credential_names_of_two_words_in_text_are_credential_names(template: str) -> None:
    secret = rand(18, string.ascii_lowercase)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


def test_two_words_that_name_no_credential_keep_their_value() -> None:
    for text in ("the cache key: abc", "max token: 5", "special token: <eos>"):
        assert S.text(text) == text


def test_a_key_hash_in_text_is_kept_when_hex_and_taken_for_the_key_otherwise() -> None:
    h = hashlib.sha256(b"k").hexdigest()
    k = key()
    assert S.text(f"user_api_key_hash={h}") == f"user_api_key_hash={h}"
    assert S.text(f"user_api_key_hash={k}") == f"user_api_key_hash={fingerprint(k)}"


@pytest.mark.parametrize(
    ("template", "value"),
    [
        ("Cookie: ai_user=abc; AppServiceAuthSession={s}\nHost: x", "ai_user=abc; AppServiceAuthSession={s}"),
        ("Set-Cookie: sid={s}; Path=/; HttpOnly", "sid={s}; Path=/; HttpOnly"),
        ("{{'Authorization': 'Digest username=\"u\", response=\"{s}\"', 'x': 1}}", 'username="u", response="{s}"'),
        ("connection failed: password: 'correct horse {s}'", "correct horse {s}"),
        ('{{"client_secret": "two words {s}"}}', "two words {s}"),
        ("password=Tr0ub4dor;{s} next", "Tr0ub4dor;{s}"),
        ("https://svc:P@ss{s}@host/v1", "P@ss{s}"),
        ("password=[{s}]", "{s}"),
        ("secret=({s})", "{s}"),
        ("password    =    {s}", "{s}"),
        ("api_key:\t\t\t\t{s}", "{s}"),
    ],
)
def test_a_value_runs_to_its_closing_quote_its_header_line_end_or_its_last_at(template: str, value: str) -> None:
    secret = rand(18, string.ascii_lowercase)
    out = S.text(template.format(s=secret))
    assert out == template.format(s=secret).replace(value.format(s=secret), fingerprint(value.format(s=secret)))
    assert S.text(out) == out


def test_a_value_ends_before_a_trailing_semicolon_and_a_header_value_keeps_its_scheme() -> None:
    k = key()
    assert S.text(f"api_key={k}; model=gpt-4o") == f"api_key={fingerprint(k)}; model=gpt-4o"
    assert S.text(f"Authorization: Bearer {k}\r\nHost: x") == f"Authorization: Bearer {fingerprint(k)}\r\nHost: x"
    assert S.text("{'token': {'a': 1}}") == "{'token': {'a': 1}}"


@pytest.mark.parametrize(
    "template",
    ["pwd={s}", "PGPASSWORD={s}", "MYSQL_PWD={s}", "<password>{s}</password>", "<token>{s}</token>", "https://x.io/v1?api%5Fkey={s}"],
)
def test_environment_passwords_xml_elements_and_url_encoded_names_give_their_values_away(template: str) -> None:
    secret = rand(18, string.ascii_lowercase)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))
    assert S.text("<name>bob</name> <tokenizer>bpe</tokenizer>") == "<name>bob</name> <tokenizer>bpe</tokenizer>"


def test_token_counts_in_text_are_not_credentials() -> None:
    text = "usage: prompt_tokens=12, completion_tokens: 5, total_tokens=17, max_tokens=256, max_token=9"
    assert S.text(text) == text


def test_values_litellm_masked_already_are_left_as_they_are() -> None:
    for masked in ("sk-...abcd", "sk-12****5678", "***REDACTED***", "redacted-by-litellm"):
        assert S.text(masked) == masked


@pytest.mark.parametrize(
    "template",
    [
        "requests.get(url, auth=('user', '{s}'))",
        'auth = ("u", "{s}")',
        "{{'auth': ('admin', '{s}'), 'timeout': 5}}",
        'session.auth = ["u", "{s}"]',
        "HTTPBasicAuth('admin', '{s}')",
        'httpx.BasicAuth(username, "{s}")',
    ],
)
def test_an_auth_tuple_in_text_gives_its_password_away(template: str) -> None:
    """requests' ``auth=(user, password)``, as a traceback quotes the line that made the call."""
    secret = rand(18, string.ascii_lowercase)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


@pytest.mark.parametrize(
    "template",
    [
        "password:\n  {s}",
        "vertex:\n  api_key:\n    {s}\n  project: p",
        "Password:\n{s}\nUsername: bob",
        "client_secret:\r\n  {s}\r\n",
        "password:\n  '{s}'",
    ],
)
def test_a_value_on_the_line_after_its_name_is_found(template: str) -> None:
    """YAML puts a value on the next line; it is taken when it stands alone there."""
    secret = rand(18, string.ascii_lowercase)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


@pytest.mark.parametrize(
    "template",
    [
        'config: {{"api\\u005fkey": "{s}"}}',
        'body="{{\\u0022api_key\\u0022: \\u0022{s}\\u0022}}"',
        "api\\u005fkey\\u003d{s} next",
        "https://x.io/v1?alt=1\\u0026key={s}",
        "dsn: postgresql:\\/\\/admin:{s}@db\\/litellm",
    ],
)
def test_json_escapes_in_a_text_hide_no_name_and_are_kept(template: str) -> None:
    """JSON quoted in a string writes ``"`` as ``\\u0022`` (Go writes ``&`` as ``\\u0026``, PHP ``/`` as
    ``\\/``); the text is read decoded, and what is not a secret is kept as written."""
    secret = rand(18, string.ascii_lowercase)
    out = S.text(template.format(s=secret))
    assert out == template.format(s=fingerprint(secret))
    assert S.text(out) == out


@pytest.mark.parametrize(
    "template",
    [
        "https://host/v1;api_key={s}/chat/completions",
        "https://host/v1;key={s}?alt=sse",
        "https://app.example.com/login;jsessionid={s}",
        "https://host/o;sig={s};v=1",
    ],
)
def test_matrix_parameters_in_a_url_path_give_their_values_away(template: str) -> None:
    secret = rand(18, string.ascii_lowercase)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


@pytest.mark.parametrize(
    ("template", "value"),
    [
        ("https://host/v1?h=Basic%20{s}", "{s}"),
        ("GET /x?headers=Authorization%3A%20Bearer%20{s}&alt=1", "{s}"),
        ("auth_header=Bearer+{s}", "{s}"),
        ("q=Basic%20{s}%3D%3D", "{s}%3D%3D"),
    ],
)
def test_url_encoded_auth_schemes_give_their_credentials_away(template: str, value: str) -> None:
    secret = f"dXNl{rand(16)}7"
    out = S.text(template.format(s=secret))
    assert out == template.format(s=secret).replace(value.format(s=secret), fingerprint(value.format(s=secret)))


@pytest.mark.parametrize("template", ["password\uff1a{s}", "api_key\uff1d{s}", "API Key\uff1a {s}", '"token"\uff1a"{s}"'])
def test_fullwidth_separators_are_separators(template: str) -> None:
    secret = rand(18, string.ascii_lowercase)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


@pytest.mark.parametrize(
    ("template", "value"),
    [
        ("password: correct horse {s}", "correct horse {s}"),
        ("PGPASSWORD: my pass {s}\nnext line", "my pass {s}"),
        ("db_password: two words {s}, user: bob", "two words {s}"),
        ("user: bob password: hunter2 {s} ip: 10.0.0.1", "hunter2 {s}"),
        ("passphrase\uff1a{s} battery staple", "{s} battery staple"),
        ("password:\n  correct horse {s}\n", "correct horse {s}"),
    ],
)
def test_a_password_after_a_colon_runs_over_its_words_to_the_line_end(template: str, value: str) -> None:
    """``name: value`` is YAML's (and a log's): a password there may be words. After ``=`` a value is one word."""
    secret = rand(18, string.ascii_lowercase)
    out = S.text(template.format(s=secret))
    assert out == template.format(s=secret).replace(value.format(s=secret), fingerprint(value.format(s=secret)))
    assert S.text(out) == out


def test_prose_after_a_credential_name_is_not_a_value() -> None:
    for text in (
        "the token: is missing",
        "Password: required",
        "Invalid password: is too short",
        "Your password: must be at least 8 characters",
        "Password: the one you chose",
        "auth: required",
        "oauth=(client_id, client_secret)",
        "scopes: auth=('read', 'write', 'admin')",
        "password:\nuser: bob",
        "secrets:\n  - name: x",
        "Cookie:\nHost: x",
        "token:\n  two words",
        "Content-Type: text/plain;charset=utf-8",
        "error;code=401",
        "?q=Basic%20authentication%20is%20off",
        "the%20Bearer%20of%20news",
        "\\u00e9t\\u00e9 token",
    ):
        assert S.text(text) == text
    assert S.text("token=is") == f"token={fingerprint('is')}", "after = a common word is still a value"


# --- the marker ---------------------------------------------------------------------------------


def test_one_key_has_one_fingerprint_wherever_it_is_found() -> None:
    k = key()
    found = {
        S.text(k),
        S.text(f"Incorrect API key provided: {k}.").split(": ")[1][:-1],
        S.text(f"Authorization: Bearer {k}").rsplit(" ", 1)[1],
        S.text(f"https://x/v1?key={k}").split("=")[1],
        S.text(f"{{'api_key': '{k}'}}").split("'")[3],
        S.value({"api_key": k})["api_key"],
        S.value({"Authorization": f"Bearer {k}"})["Authorization"].split(" ")[1],
        S.field("user_api_key_hash", f"Bearer {k}"),
        S.field("user_api_key_hash", f" {k}"),
    }
    assert found == {fingerprint(k)}
    assert S.text(key()) != fingerprint(k)


def test_the_salt_env_var_changes_every_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    k = key()
    monkeypatch.setenv(SALT_ENV, "team-salt-1")
    one = Scrubber().text(k)
    monkeypatch.setenv(SALT_ENV, "team-salt-2")
    two = Scrubber().text(k)
    assert one == fingerprint(k, "team-salt-1") and two == fingerprint(k, "team-salt-2") and one != two
    monkeypatch.delenv(SALT_ENV)
    assert Scrubber().text(k) == fingerprint(k)


def test_scrubbing_twice_changes_nothing() -> None:
    k = key()
    samples = [
        f"Authorization: Bearer {k}",
        f"https://{k}:{rand()}@host/x?key={rand()}",
        f"api_key={k}, token: {rand()} max_token={k}",
        "-----BEGIN PRIVATE KEY-----\nabc",
        f"{SHAPES['jwt']()} {SHAPES['pem']()}",
        "user:pass [REDACTED:0123abcd] api_key=[REDACTED:0123abcd]",
    ]
    for text in samples:
        once = S.text(text)
        assert S.text(once) == once, (text, once)
    value = {"api_key": k, "headers": {"Authorization": f"Bearer {k}"}, "tags": [f"api_key:{k}", k], k: 1}
    once = S.value(value)
    assert S.value(once) == once


# --- added patterns and content -----------------------------------------------------------------


def test_added_patterns_scrub_their_match_or_first_group_and_leave_markers_alone() -> None:
    s = Scrubber([re.compile(r"EMP-\d{6}"), re.compile(r"ticket=(\w+)"), re.compile(r"[0-9a-f]{4}")], salt=DEFAULT_SALT)
    out = s.text(f"EMP-123456 ticket=T42 {key()}")
    assert "EMP-123456" not in out and "T42" not in out and "ticket=" in out
    assert s.text(out) == out
    assert all(MARKER.fullmatch(m) for m in re.findall(r"\[REDACTED:[^\]]*\]", out))


def test_content_off_leaves_prompts_and_completions_but_not_parameters() -> None:
    from types import SimpleNamespace

    k1, k2, k3, k4 = key(), key(), key(), key()
    span = SimpleNamespace(
        name="litellm-completion",
        attributes={
            "mlflow.spanInputs": {"messages": [{"role": "user", "content": k1}], "api_key": k2},
            "mlflow.spanOutputs": {"choices": [{"message": {"content": k3}}]},
            "raw_llm_response": {"x": k3},
            "request_tags": [f"api_key:{k4}"],
        },
        events=[("exception", 1, {"exception.message": f"401 {k4}"})],
        error=f"401 {k4}",
    )
    Scrubber(content=False).spans([span])
    text = json.dumps([span.attributes, span.events, span.error])
    assert k1 in text and k3 in text
    assert k2 not in text and k4 not in text


def test_one_object_under_several_keys_and_spans_is_scrubbed_wherever_it_is() -> None:
    """The builder puts one response object under outputs and ``raw_llm_response``, and an attempt's
    inputs on the root too; the scrubber does such an object once, and each place gets its result,
    but a credential name above one of the places still decides what that place gets."""
    from types import SimpleNamespace

    k1, k2 = key(), key()
    response = {"choices": [{"message": {"content": f"here: {k1}"}}], "usage": {"prompt_tokens": 3}}
    inputs = {"messages": [{"role": "user", "content": f"Authorization: Bearer {k2}"}]}

    def span(**attrs: Any) -> SimpleNamespace:
        return SimpleNamespace(name="s", attributes=attrs, events=[], error=None)

    root = span(**{"mlflow.spanInputs": inputs, "mlflow.spanOutputs": response, "raw_llm_response": response})
    child = span(**{"mlflow.spanInputs": inputs, "raw_llm_response": response, "client_secret": response})
    Scrubber().spans([root, child])
    expected = Scrubber().value(response)
    for place in (root.attributes["mlflow.spanOutputs"], root.attributes["raw_llm_response"], child.attributes["raw_llm_response"]):
        assert place == expected and k1 not in json.dumps(place)
    assert MARKER.fullmatch(child.attributes["client_secret"])
    assert root.attributes["mlflow.spanInputs"] == child.attributes["mlflow.spanInputs"] == Scrubber().value(inputs)
    assert k2 not in json.dumps([root.attributes, child.attributes])
    assert k1 in json.dumps(response) and k2 in json.dumps(inputs), "the built values themselves are not changed"


def test_a_dict_deeper_than_any_export_limit_is_still_scrubbed_by_its_names() -> None:
    """Past the nesting the exporters send as JSON text, a value under a credential name is still one,
    an object (which text rules cannot take whole) as much as a string."""
    secret, words = rand(18, string.ascii_lowercase), f"correct horse {rand(12, string.ascii_lowercase)}"
    credentials = {"refresh": rand(18, string.ascii_lowercase)}
    deep: Any = [{"clientSecret": secret}, {"password": words}, ("sk-TUPLE12345",), {"credentials": credentials}]
    for _ in range(40):
        deep = {"a": [deep]}
    out = S.value(deep)
    leaf = out
    for _ in range(40):
        leaf = leaf["a"][0]
    assert leaf == [
        {"clientSecret": fingerprint(secret)},
        {"password": fingerprint(words)},
        (fingerprint("sk-TUPLE12345"),),
        {"credentials": fingerprint(json.dumps(credentials))},
    ]


def test_a_container_met_twice_or_inside_itself_is_scrubbed_once() -> None:
    k = key()
    shared = {"api_key": k}
    loop: list[Any] = [shared, shared]
    loop.append(loop)
    out = S.value(loop)
    assert out[0] is out[1] and out[0] == {"api_key": fingerprint(k)} and out[2] is out


def built(**changes: Any) -> Any:
    """The trace of one real capture record, changed."""
    from ingest.dedupe import dedupe
    from ingest.normalize import normalize
    from ingest.sources import split_lines
    from ingest.spans import build_trace

    record = {**next(r for r in read_capture() if r["status"] == "success"), **changes}
    lines, _ = split_lines("calls.jsonl", (json.dumps(record) + "\n").encode(), 0, 1)
    frame, bad = normalize(lines)
    assert not bad
    return build_trace(list(dedupe(frame)[0].iter_rows(named=True)), "1", scrub=S)


def test_the_request_tags_attribute_is_scrubbed_as_the_trace_tags_are() -> None:
    """A tag's value under a credential name is a secret whole, spaces and all, not only its first word."""
    secret = "correct horse battery staple"
    trace = built(request_tags=[f"password: {secret}", "team:a"])
    attrs = trace.data[0].attributes
    tag = attrs["mlflow.traceTag.password"]
    assert MARKER.fullmatch(tag) and attrs["request_tags"] == [f"password: {tag}", "team:a"]
    assert "horse" not in json.dumps(attrs, default=str)


def test_a_null_request_tag_is_skipped_not_the_call() -> None:
    attrs = built(request_tags=[None, "team:a"]).data[0].attributes
    assert attrs["request_tags"] == ["team:a"] and attrs["mlflow.traceTag.team"] == "a"


# --- robustness ---------------------------------------------------------------------------------


def test_odd_values_never_raise() -> None:
    deep: Any = "sk-DEEP1234567"
    for _ in range(300):
        deep = {"a": [deep]}
    odd = {"s": "\ud800 sk-LONE1234\udfff", 1: "x", "n": 2**90, "f": float("nan"), "t": ("sk-TUPLE12345",), "d": deep, "b": b"raw"}
    out = S.value(odd)
    assert "sk-LONE1234" not in out["s"] and out["n"] == 2**90 and out["b"] == b"raw"
    assert "sk-DEEP1234567" not in json.dumps(out, default=str) and "sk-TUPLE12345" not in json.dumps(out, default=str)


@pytest.mark.parametrize(
    "attack",
    [
        "-----BEGIN PRIVATE KEY-----" * 3000,
        "api_key=" * 20000,
        "max_token=" * 20000,
        "https://" + "a:" * 40000,
        "?key=" * 20000,
        "sk-" + "a" * 200000,
        "eyJ" + "a" * 100000 + ".eyJ" * 1000,
        "Bearer " * 20000,
        "a" * 1_000_000,
        "auth=('a', " * 20000,
        "\\u0022" * 100000,
        "password:\n " * 20000,
        "password: " + "a " * 200000,
        '("api_key", ' * 40000,
        '("api_key", "' + "a" * 500_000,
        "('api_key', 'a (\"token\", \"b " * 15000,
        '["token", "abc1" ' * 30000,
        "--api-key " * 50000,
        '--api-key "' + "a" * 500_000,
        "--password a1 " * 35000,
        "curl " + "-u a:b1 " * 60000,
        "curl -u 'a:" + "b" * 500_000,
        "curl " + "x" * 2000 + " -u a:b" * 70000,
        "mysql\n" + " -a" * 50000,
        "mysql " + " -pa" * 40000,
        "http " + " -a a:b" * 30000,
        "&quot;" * 80000,
        "&quot;api_key&quot;: " * 25000,
        "api_key%3D" * 60000,
        "%26token%3D" + "a%" * 250000,
    ],
)
def test_adversarial_text_is_scrubbed_in_bounded_time(attack: str) -> None:
    t0 = time.monotonic()
    S.text(attack)
    assert time.monotonic() - t0 < 3.0


# --- properties ---------------------------------------------------------------------------------

FRAGMENTS = [
    "sk-", "Bearer ", "Basic ", "api_key", "API-KEY", "token", "max_token", "password", "=", ": ", ":", "://", "@", "?key=", "&",
    "[REDACTED:", "]", "[REDACTED:0123abcd]", "-----BEGIN PRIVATE KEY-----", "-----END PRIVATE KEY-----", "eyJ", ".", "AKIA",
    "'", '"', "\\", " ", "\n", "abc123XYZ", "ABCDEFGHIJKLMNOP1234", "_", "-", "user", "https",
]  # fmt: skip
texts = st.one_of(st.text(max_size=40), st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=6), max_size=12).map("".join))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_is_scrubbed_without_raising_and_idempotently(value: Any) -> None:
    once = S.value(value)
    assert S.value(once) == once or _nan_in(once)


def _nan_in(value: Any) -> bool:
    return "NaN" in json.dumps(value, default=str)


SEPARATORS = " \n\t,;:='\"()[]{}<>/|"


@st.composite
def planted(draw: st.DrawFn) -> tuple[Any, str]:
    """Random JSON with a fresh key planted at a random spot: as a value, as a dict key, or inside a
    string, set off from the text around it by a separator (a key glued to a word is another word)."""
    k = "sk-" + draw(st.text(string.ascii_letters + string.digits + "_-", min_size=8, max_size=40)) + draw(st.sampled_from("0123456789"))
    value = draw(json_values)
    where = draw(st.sampled_from(["value", "key", "text"]))
    if where == "text":
        before, after = draw(texts), draw(texts)
        leaf: Any = before + draw(st.sampled_from(SEPARATORS)) + k + draw(st.sampled_from(SEPARATORS)) + after
    else:
        leaf = k
    path = draw(st.lists(st.sampled_from(["list", "dict"]), max_size=30))
    node: Any = {leaf: value} if where == "key" else leaf
    for kind in path:
        node = [value, node] if kind == "list" else {"x": value, "y": node}
    return node, k


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planted())
def test_a_planted_key_never_survives_anywhere_in_random_json(case: tuple[Any, str]) -> None:
    node, k = case
    out = json.dumps(S.value(node), default=str)
    assert k not in out


_NAMES = [
    "api_key", "api-key", "apikey", "secret_key", "secret", "access_key", "private-key", "master_key", "account_key", "subscription-key",
    "token", "password", "passwd", "passphrase", "authorization", "cookie", "credential", "credentials",
]  # fmt: skip
_SHAPES = [
    "-----BEGIN RSA PRIVATE KEY-----MIIEow", "https://user:hunter2@host", "https://x.io/a?key=abc123", "/v1?x=1&sig=zzz",
    "Bearer abcdef123456", "bearer\tabcdef123456", "Basic dXNlcjpwYXNz", "sk-abc123XYZ", "AKIAABCDEFGHIJKLMNOP", "ASIA0123456789ABCDEF",
    "ABIAABCDEFGHIJKLMNOP", "ACCAABCDEFGHIJKLMNOP", "sk_live_abcdefgh1", "rk_test_abcdefgh1", "AIza" + "a" * 35, "ya29." + "b" * 20,
    "eyJabcdef.eyJab.sig", "ghp_" + "c" * 20, "gho_" + "c" * 20, "ghu_" + "c" * 20, "ghs_" + "c" * 20, "ghr_" + "c" * 20,
    "github_pat_" + "d" * 40, "glpat-" + "e" * 20, "xoxb-" + "1" * 10, "hf_" + "f" * 20, "gsk_" + "g" * 20, "xai-" + "h" * 20,
    "r8_" + "i" * 20, "pplx-" + "j" * 20, "tvly-" + "k" * 20, "npm_" + "l" * 36, "dapi" + "a" * 32, "lsv2_pt_" + "a" * 32 + "_" + "b" * 10,
    "SG." + "m" * 22 + "." + "n" * 43, "csk-" + "o" * 20, "nvapi-" + "p" * 20, "jina_" + "q" * 40, "pcsk_r4r4_" + "r" * 30,
    "fw_" + "s" * 20, "esecret_" + "t" * 20,
    "auth=('u', 'p4ss')", "AUTH: [\"u\", \"p4ss\"]", "HTTPBasicAuth('u', 'p4ss')", "/v1;sig=abc",
    "/x;jsessionid=abc", "?h=Basic%20dXNlcjpwYXNz", "%20Bearer%20abcdef123456", "('x-api-key', 'v4lue')", '["Token", "v4lue"]',
    "[(b'authorization', b'v4lue')]", "--api-key v4lue", "--PASSWORD 'v4lue'", "curl -u u:p4ss", "curl --proxy-user=u:p4ss",
    "http -a u:p4ss x.io", "https --auth=u:p4ss x.io", "mysql -pp4ss", "sshpass -p p4ss ssh h", "redis-cli -a p4ss",
    "body=api_key%3Dv4lue", "%26token%3Dv4lue", "%3fsig%3dv4lue",
]  # fmt: skip
_CASED = str.maketrans({"i": "\u0131", "s": "\u017f", "k": "\u212a"})


def _pairs() -> list[str]:
    """Every credential name as ``re.IGNORECASE`` takes it: upper case, and with the non-ASCII letters it folds to i, s and k."""
    names = [v for n in _NAMES for v in (n, n.upper(), n.title(), n.translate(_CASED), n.replace("i", "\u0130"))]
    pairs = [f"{n}{sep}v4lue" for n in names for sep in ("=", ": ", '\\"=\\"', "'='", "\uff1a", "\uff1d")]
    pairs += [f"{n} <- 'v4lue'" for n in names]
    pairs += [f"const {n} = `v4lue`" for n in names]
    pairs += [f'System.setProperty("openai.{n}", "v4lue")' for n in names]
    pairs += [f"ENV {n} v4lue" for n in names] + [f'\tENV {n} \\"v4lue\\"' for n in names]
    return pairs + [f'os.putenv("{n}", "v4lue")' for n in names] + [f"SetEnv( \\'{n}\\',\tb\\'v4lue\\'" for n in names]


_MATCHING = _SHAPES + _pairs()


def test_every_planted_shape_and_name_is_one_the_patterns_match_and_the_prefilter_passes() -> None:
    from ingest.scrub import _builtin, _may_hold_secret

    assert [t for t in _MATCHING if _builtin(t).search(t) is None] == []
    assert [t for t in _MATCHING if not _may_hold_secret(t)] == []


@settings(max_examples=1500, deadline=None)
@given(st.text(max_size=20), st.sampled_from(_MATCHING), st.text(max_size=20))
def test_the_prefilter_passes_every_text_the_patterns_match(before: str, planted: str, after: str) -> None:
    """The cheap test that lets most texts skip the patterns must never skip one they match."""
    from ingest.scrub import _builtin, _may_hold_secret

    for text in (planted, before + planted + after):
        assert _builtin(text).search(text) is None or _may_hold_secret(text), text


HUNTED = {
    "a bytes literal after a name (botocore's signed request)": "{{'X-Amz-Security-Token': b'{s}', 'Content-Type': b'json'}}",
    "a unicode literal after a name": "{{u'password': u'{s}'}}",
    "a list-valued header in JSON text (Go's http.Header)": '{{"X-Api-Key":["{s}"],"Accept":["*/*"]}}',
    "a list-valued Authorization": '{{"Authorization":["Token {s}"]}}',
    "a key on its own line of JSON text": "openai\\n{s}\\ngemini",
    "a name after an escaped line break (an ini file in JSON text)": "[azure]\\napi_key={s}\\nregion=eu",
    "a header after an escaped CRLF (a raw request quoted)": "POST /v1 HTTP/1.1\\r\\napi-key: {s}\\r\\nhost: x",
    "a name after an escaped tab": "cfg:\\ttoken={s}",
    "a key URL-encoded in quotes": "https://x.test/search?q=%22{s}%22",
    "a no-break space before the value": "API Key:\u00a0{s}",
    "a no-break space before the colon": "Password\u00a0: {s}",
    "an ideographic space after the colon": "secret:\u3000{s}",
}


@pytest.mark.parametrize("case", list(HUNTED))
def test_credentials_in_the_text_forms_a_hunt_found_kept(case: str) -> None:
    """Each form kept the secret verbatim in MLflow (found by a hunt with real records end to end)."""
    secret = f"sk-proj-{rand(40)}" if "own line" in case or "URL-encoded" in case else rand(32)
    out = S.text(HUNTED[case].format(s=secret))
    assert secret not in out and "[REDACTED:" in out, out


@pytest.mark.parametrize("name", ["azureOpenAIApiKey", "openAIApiKey", "OpenAIAPIKey", "HFToken", "APIToken", "SASToken",
                                  "GCPCredentials", "azureADToken"])  # fmt: skip
def test_a_camel_case_name_with_an_acronym_is_a_credential_name(name: str) -> None:
    secret = rand(32)
    assert secret not in json.dumps(S.value({"extra_body": {name: secret}}))
    assert secret not in S.text(f"{{'{name}': '{secret}'}}") and secret not in S.text(f"{name}: {secret}")


@pytest.mark.parametrize("name", ["maxTokens", "promptTokens", "GPTTokenizer", "totalTokenCount", "XMLParser"])
def test_a_camel_case_name_that_is_no_credential_keeps_its_value(name: str) -> None:
    assert S.value({name: "visible-value"}) == {name: "visible-value"}


# --- keys assigned in program code (a user pastes code into a prompt, a model answers with code) ---


@pytest.mark.parametrize(
    "template",
    [
        'const apiKey: string = "{s}";',
        "let token: string = '{s}';",
        'private readonly apiKey: string | undefined = "{s}";',
        'let api_key: &str = "{s}";',
        'const API_KEY: &\'static str = "{s}";',
        'api_key: str = "{s}"',
        'val apiKey: String = "{s}"',
        'apiKey := "{s}"',
        'var apiKey string = "{s}"',
        'api_key:="{s}"',
    ],
)
def test_a_key_assigned_to_a_typed_name_or_with_go_s_walrus_is_its_marker(template: str) -> None:
    """The type (or the ``=`` of ``:=``) was taken for the value after ``:``, and the key kept."""
    secret = rand(32)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


@pytest.mark.parametrize("template", ["{s}:", " {s}: denied", "x {s}:y", "{s} = 1", "{s}\t:\t"])
def test_a_key_with_a_credential_word_in_it_before_a_separator_is_its_marker(template: str) -> None:
    """Read as the name of a pair (``…PWD…``, ``…Key…`` in a random key) whose value was none, the
    key itself was kept: Hypothesis found ``sk-0000PWD00:``."""
    for secret in ("sk-0000PWD00", "sk-proj-" + rand(12) + "Key" + rand(12)):
        assert secret not in S.text(template.format(s=secret)), template


def test_a_typed_name_or_walrus_that_holds_no_key_keeps_its_code() -> None:
    for text in (
        "token_count := 5",
        "tokenCount := len(tokens)",
        "const tokenizer: Tokenizer = new Tokenizer();",
        "def f(api_key: str = None, token: str = '', max_tokens: int = 256):",
        "api_key: Optional[str] = None",
        "let token: string | undefined = undefined;",
    ):
        assert S.text(text) == text
    k = rand(32)
    assert S.text(f"token: {k}=") == f"token: {fingerprint(k + '=')}", "a value ending in = is no type"
    assert S.text(f"token: abc={k}") == f"token: {fingerprint('abc=' + k)}"


def test_code_that_reads_a_key_keeps_what_it_reads() -> None:
    """A qualified call or subscript of a quoted name after a credential name reads the key from
    elsewhere: there is no secret, and the name of the variable it reads stays readable."""
    for text in (
        'api_key = os.environ["OPENAI_API_KEY"]',
        "api_key=os.environ['OPENAI_API_KEY']",
        'api_key = os.getenv("OPENAI_API_KEY")',
        'client = OpenAI(api_key=os.environ.get("OPENAI_API_KEY"))',
        'apiKey := os.Getenv("OPENAI_API_KEY")',
        'let api_key = env::var("OPENAI_API_KEY").unwrap();',
        'String apiKey = System.getenv("OPENAI_API_KEY");',
        "const apiKey = process.env.OPENAI_API_KEY;",
        "model_list:\n  - litellm_params:\n      api_key: os.environ/AZURE_API_KEY\n",
        "api_key = settings.load_key()",
    ):
        assert S.text(text) == text
    secret = rand(18, string.ascii_lowercase)
    for template in ("password=my.{s}(1)", "token={s}(x)", "api_key={s}.x"):
        assert secret not in S.text(template.format(s=secret)), "a word with a bracket after it is still a value"


@pytest.mark.parametrize(
    "template",
    [
        'os.environ["AZURE_API_KEY"] = "{s}"',
        "os.environ['OPENAI_API_KEY']='{s}'",
        'headers["x-api-key"] = "{s}"',
        "config[ 'api_key' ] = '{s}'",
        'process.env["OPENAI_API_KEY"] = "{s}";',
        'ENV["ANTHROPIC_API_KEY"] = "{s}"',
        "$_ENV['DB_PASSWORD'] = '{s}';",
        'code: os.environ[\\"AZURE_API_KEY\\"] = \\"{s}\\"',
        '```python\nimport os\nos.environ["AZURE_API_KEY"] = "{s}"\n```',
    ],
)
def test_a_key_assigned_to_a_subscripted_credential_name_is_its_marker(template: str) -> None:
    secret = rand(32)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


def test_a_subscripted_credential_name_given_no_key_keeps_its_code() -> None:
    for text in (
        'os.environ["OPENAI_API_KEY"] = os.getenv("AZURE_OPENAI_API_KEY")',
        'os.environ["OPENAI_API_KEY"] = ""',
        "os.environ['OPENAI_API_KEY'] = None",
        'del os.environ["OPENAI_API_KEY"]',
        'keys = ["api_key", "model"]',
        'print(config["api_key"])',
    ):
        assert S.text(text) == text


@pytest.mark.parametrize(
    "template",
    [
        'os.environ.setdefault("X_API_KEY", "{s}")',
        "os.putenv('OPENAI_API_KEY', '{s}')",
        'monkeypatch.setenv("ANTHROPIC_API_KEY", "{s}")',
        'os.Setenv("OPENAI_API_KEY", "{s}")',
        'std::env::set_var("MISTRAL_API_KEY", "{s}");',
        'Environment.SetEnvironmentVariable("AZURE_OPENAI_API_KEY", "{s}");',
        'api_key = os.getenv("OPENAI_API_KEY", "{s}")',
        'token = os.environ.get("HF_TOKEN", "{s}")',
        'key = ENV.fetch("OPENAI_API_KEY", "{s}")',
        'tool call: {{"code": "os.putenv(\\"DB_PASSWORD\\", \\"{s}\\")"}}',
    ],
)
def test_a_key_given_to_an_environment_setter_or_as_a_getter_s_default_is_its_marker(template: str) -> None:
    """The name and the key are a call's two arguments, not ``name = value``; the key was kept."""
    secret = rand(32)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


def test_a_call_with_no_key_after_a_credential_name_keeps_its_arguments() -> None:
    for text in (
        'os.environ.setdefault("OPENAI_API_KEY", "")',
        'os.environ.setdefault("MODEL_NAME", "gpt-4o")',
        'os.getenv("OPENAI_API_KEY", None)',
        'api_key = os.getenv("OPENAI_API_KEY", default_key)',
        'tokens = tokenizer.encode("hello", "world")',
        'print("api_key", "missing")',
        'keys = ("api_key", "token")',
    ):
        assert S.text(text) == text


def test_a_credential_name_compared_with_a_literal_keeps_its_operator() -> None:
    """``==`` was read as ``=`` and a value ``=``: the second ``=`` became a marker, the literal kept."""
    secret = rand(32)
    for template in ('if api_key == "{s}":', "if (token === '{s}') {{", 'assert os.environ["OPENAI_API_KEY"] == "{s}"'):
        assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))
    for text in ('if api_key == "":', "if token == None:", "if (apiKey === undefined) {"):
        assert S.text(text) == text


@pytest.mark.parametrize(
    "template",
    ['api_key <- "{s}"', "OPENAI_API_KEY <- '{s}'", "token <- {s}", 'Sys.setenv(x = 1); db_password<-"{s}"', 'api_key <<- "{s}"'],
)
def test_a_key_assigned_with_r_s_arrow_is_its_marker(template: str) -> None:
    """R's ``<-`` was no separator: the name had no value and the key was kept."""
    secret = rand(32)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


def test_an_arrow_that_assigns_no_key_keeps_its_code() -> None:
    for text in (
        "tokens <- ch",
        "tokenCount <- length(tokens)",
        'api_key <- Sys.getenv("OPENAI_API_KEY")',
        'api_key <- ""',
        "api_key <- NULL",
        "if (n_tokens <-1) stop()",
    ):
        assert S.text(text) == text


@pytest.mark.parametrize(
    "template",
    ["Authorization: Bearer {s}", "Bearer {s}", "token={s}", 'api_key="{s}"', "api_key: '{s}'", "https://x.io/v1?key={s}&a=1"],
)
def test_a_credential_longer_than_a_values_cap_is_one_marker_not_a_marker_and_its_tail(template: str) -> None:
    """A value runs at most 4096 characters per match: a longer token (an Azure AD JWT with its groups)
    became a marker followed by the rest of itself, in clear."""
    secret = rand(6000)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


@pytest.mark.parametrize(
    "template",
    ["'api_key' => '{s}',", '"OPENAI_API_KEY" => "{s}"', ":api_key => '{s}'", "api_key=>'{s}'", 'my %cfg = (password => "{s}");'],
)
def test_a_key_in_a_php_ruby_or_perl_hash_is_its_marker(template: str) -> None:
    """``=>`` was no separator: a PHP array's, a Ruby hash's or a Perl hash's key was kept."""
    secret = rand(32)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


def test_a_fat_arrow_that_gives_no_quoted_key_keeps_its_code() -> None:
    for text in ("tokens.map(token => token.trim())", "'api_key' => env('OPENAI_API_KEY'),", ":token => nil", "password => $pw"):
        assert S.text(text) == text


@pytest.mark.parametrize(
    "template",
    [
        'ENV OPENAI_API_KEY "{s}"',
        "ENV OPENAI_API_KEY {s}",
        "FROM python:3.12\n  ENV ANTHROPIC_API_KEY '{s}'\nRUN pip install litellm",
        'dockerfile: {{"text": "FROM python:3.12\\nENV HF_TOKEN \\"{s}\\"\\n"}}',
    ],
)
def test_a_key_set_by_a_dockerfile_s_legacy_env_is_its_marker(template: str) -> None:
    """``ENV NAME value`` (a space, no ``=``) was no pair: the key was kept."""
    secret = rand(32)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


def test_a_dockerfile_s_legacy_env_value_is_the_rest_of_its_line() -> None:
    assert S.text("ENV DB_PASSWORD correct horse battery\nRUN x") == f"ENV DB_PASSWORD {fingerprint('correct horse battery')}\nRUN x"


def test_a_legacy_env_that_sets_no_key_keeps_its_text() -> None:
    for text in (
        "ENV MAX_TOKENS 4096",
        'ENV OPENAI_API_KEY ""',
        "ENV TOKEN must be set at run time",
        "RUN echo ENV OPENAI_API_KEY is read at run time",
        "the ENV OPENAI_API_KEY abc123 line",
        "env OPENAI_API_KEY",
    ):
        assert S.text(text) == text


@pytest.mark.parametrize(
    "template",
    [
        'System.setProperty("openai.api.key", "{s}");',
        'System.setProperty("auth.token", "{s}");',
        'props.setProperty("spring.datasource.db.password", "{s}");',
        'String key = System.getProperty("anthropic.api.key", "{s}");',
        'System.setProperty("OPENAI_API_KEY", "{s}");',
        'props.put("api.key", "{s}");',
        'Map.of().put("openai.api.key", "{s}")',
        "openai.api.key={s}",
        "azure.openai.subscription.key = {s}",
        '"anthropic.api.key": "{s}"',
    ],
)
def test_a_key_given_to_a_property_setter_is_its_marker(template: str) -> None:
    """A dotted property's name read by its last part only (``key``) was no credential name: the key
    was kept, in a setter, a ``put``, a Java properties file and JSON."""
    secret = rand(32)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


def test_a_dotted_name_is_a_credential_name_in_a_dict_too() -> None:
    secret = rand(32)
    got = S.value({"openai.api.key": secret, "headers": {"x.access.key": secret}, "cache.key": "users", "sort.key": "ts"})
    marker = fingerprint(secret)
    assert got == {"openai.api.key": marker, "headers": {"x.access.key": marker}, "cache.key": "users", "sort.key": "ts"}


def test_a_property_that_holds_no_key_keeps_its_code() -> None:
    for text in (
        'System.setProperty("http.keepAlive", "false");',
        'System.setProperty("max.tokens", "4096");',
        'System.setProperty("openai.api.key", "");',
        'String key = System.getProperty("openai.api.key");',
        'props.setProperty("tokenizer.name", "cl100k_base");',
        'cache.put("cache.key", "users");',
        "spring.cache.key=users",
        'input("api_key", "default")',
    ):
        assert S.text(text) == text


@pytest.mark.parametrize(
    "template",
    [
        "const apiKey = `{s}`;",
        "let token: string = `{s}`",
        "const OPENAI_API_KEY=`{s}`",
        "password: `{s}`",
        "api_key = `{s}` + suffix",
    ],
)
def test_a_key_in_a_template_literal_is_its_marker_and_its_backticks_kept(template: str) -> None:
    """The backticks were read as part of one word: the marker replaced them, and fingerprinted `key`, not the key."""
    secret = rand(32)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


def test_a_template_literal_that_reads_its_value_keeps_its_code() -> None:
    for text in (
        "const apiKey = `${process.env.OPENAI_API_KEY}`;",
        "const authorization = `Bearer ${token}`;",
        "const token = `${prefix}-${id}`;",
        "const apiKey = ``;",
        "Set `api_key` to your key",
        "token: `None`",
    ):
        assert S.text(text) == text


def test_a_credential_names_type_is_no_value() -> None:
    """``def f(token: str)`` and a dataclass's ``password: str`` had their type replaced by a marker
    (a prompt with code in it came back unreadable); a value after ``:`` still is one."""
    for text in ("def f(token: str) -> None:", "    password: str\n", "token: Optional[str],", "apiKey: String,", "fn f(api_key: &str) {"):
        assert S.text(text) == text
    secret = rand(32)
    for template in ("token: {s}", "password: {s}\n", 'token: "{s}",'):
        assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


def test_the_caches_of_scrubbed_texts_keys_and_tags_stay_bounded_over_a_daemons_months() -> None:
    from ingest.scrub import _CACHED_STRINGS

    s = Scrubber()
    for i in range(_CACHED_STRINGS + 10):
        s.value({f"k{i}": f"v{i}"})
        s.tag(f"team:t{i}")
    assert 0 < len(s._texts) <= _CACHED_STRINGS
    assert 0 < len(s._keys) <= _CACHED_STRINGS
    assert 0 < len(s._tags) <= _CACHED_STRINGS
    assert s.text("v1") == "v1" and s.tag("team:t1") == ("team", "t1", "team:t1")


@pytest.mark.parametrize("content", [True, False], ids=["content scrubbed", "content verbatim"])
def test_added_patterns_leave_the_keys_and_words_mlflow_reads_as_they_are(content: bool) -> None:
    """``--scrub-pattern token`` rewrote ``mlflow.chat.tokenUsage`` and every trace lost its token
    counts; ``session`` its session, ``Inputs`` its inputs, ``a`` nearly every key (the trace's cost
    read 0). The patterns scrub values and the client's tag keys; the keys and words of ours and
    MLflow's in spans and events stay."""
    from ingest.dedupe import dedupe
    from ingest.normalize import normalize
    from ingest.sources import split_lines
    from ingest.spans import build_traces

    data = "".join(json.dumps(r) + "\n" for r in read_capture()).encode()
    lines, _ = split_lines("calls.jsonl", data, 0, 1)
    frame = dedupe(normalize(lines)[0])[0]
    plain = build_traces(frame, "1")
    wild = Scrubber(["token", "session", "Inputs", "a", "A", "e", "exception"], content=content)
    scrubbed = build_traces(frame, "1", scrub=wild)
    own = ("mlflow.chat.tokenUsage", "mlflow.llm.cost", "mlflow.spanType", "mlflow.spanLogLevel", "mlflow.message.format")
    name = "mlflow.traceTag.mlflow.traceName"

    def request_tag(key: str) -> bool:  # a request tag's key is the client's, scrubbed as its tags are
        return key.startswith("mlflow.traceTag.") and key != name

    changed = 0
    for p, s in zip(plain, scrubbed, strict=True):
        for a, b in zip(p.data, s.data, strict=True):
            assert a.name == b.name or MARKER.search(b.name)  # only the call type in it, scrubbed as built
            assert [k for k in a.attributes if not request_tag(k)] == [k for k in b.attributes if not request_tag(k)]
            assert {k: a.attributes.get(k) for k in own} == {k: b.attributes.get(k) for k in own}
            assert b.attributes.get(name) in (None, s.data[0].name), "the trace's name is its root span's"
            assert [(n, t, list(x)) for n, t, x in a.events] == [(n, t, list(x)) for n, t, x in b.events]
            changed += a.attributes != b.attributes
    assert changed, "the patterns still scrub what they match in values"


@pytest.mark.parametrize(
    "template",
    [
        '{{"name": "x-api-key", "value": "{s}"}}',
        '[{{"name":"Authorization","value":"{s}"}},{{"name":"accept","value":"*/*"}}]',
        "env:\n  - name: AZURE_OPENAI_API_KEY\n    value: {s}\n  - name: MODEL\n    value: gpt-4o\n",
        '- {{name: OPENAI_API_KEY, value: "{s}"}}',
        '{{"key": "x-api-key", "value": "{s}", "type": "text"}}',
        '{{\\"name\\": \\"api_key\\", \\"value\\": \\"{s}\\"}}',
        '<appSettings>\n  <add key="ApiKey" value="{s}" />\n</appSettings>',
        '<add key="OpenAI:ApiKey" value="{s}"/>',
    ],
)
def test_a_key_given_as_a_name_value_pair_in_text_is_its_marker(template: str) -> None:
    """HAR headers, Kubernetes and ECS env lists, Postman's key/value, .NET's ``<add key= value=/>``: the
    name and the value are two fields (``name: OPENAI_API_KEY`` then ``value: …``), and the key was kept."""
    secret = rand(32)
    assert S.text(template.format(s=secret)) == template.format(s=fingerprint(secret))


def test_a_name_value_pair_that_gives_no_key_keeps_its_value() -> None:
    for text in (
        '{"name": "max_tokens", "value": "100"}',
        "- name: OPENAI_API_KEY\n  valueFrom:\n    secretKeyRef: {name: llm, key: api-key}",
        '{"name": "x-api-key", "value": ""}',
        '{"name": "accept", "value": "application/json"}',
        '<add key="MaxTokens" value="100" />',
    ):
        assert S.text(text) == text


def test_a_key_given_as_a_name_value_pair_in_data_is_its_marker() -> None:
    """The same pairs as data (a tool call's arguments, metadata): the value sits under the name the pair gives it."""
    secret = rand(32)
    given = {
        "headers": [{"name": "X-Api-Key", "value": secret}, {"name": "accept", "value": "*/*"}],
        "env": [{"name": "OPENAI_API_KEY", "value": secret}, {"name": "MAX_TOKENS", "value": "100"}],
        "postman": {"key": "api_key", "value": secret},
    }
    assert S.value(given) == {
        "headers": [{"name": "X-Api-Key", "value": fingerprint(secret)}, {"name": "accept", "value": "*/*"}],
        "env": [{"name": "OPENAI_API_KEY", "value": fingerprint(secret)}, {"name": "MAX_TOKENS", "value": "100"}],
        "postman": {"key": "api_key", "value": fingerprint(secret)},
    }


# --- command lines and pairs pasted into prompts ----------------------------------------------------


@pytest.mark.parametrize(
    ("template", "value"),
    [
        ("headers=[('x-api-key', '{s}')]", "{s}"),
        ('("api_key", "{s}")', "{s}"),
        ('["Authorization", "Token {s}"]', "{s}"),
        ("[(b'authorization', b'{s}'), (b'accept', b'*/*')]", "{s}"),
        ('{{"headers": [[\\"X-Api-Key\\", \\"{s}\\"]]}}', "{s}"),
        ("( 'password' , 'two words {s}' )", "two words {s}"),
    ],
)
def test_a_key_given_as_a_tuple_or_list_pair_in_text_is_its_marker(template: str, value: str) -> None:
    """Headers as a list of pairs (``headers=[("x-api-key", "…")]``, ASGI's ``(b"authorization", b"…")``):
    a credential name, a comma, a quoted value, closed by the bracket."""
    secret = rand(18, string.ascii_lowercase)
    out = S.text(template.format(s=secret))
    assert out == template.format(s=secret).replace(value.format(s=secret), fingerprint(value.format(s=secret)))
    assert S.text(out) == out


def test_a_tuple_or_list_that_pairs_no_name_with_a_key_keeps_its_strings() -> None:
    """Names listed (``["api_key", "api_base"]``, CORS's headers), more than two strings, a call's
    arguments, a subscript, an empty or a null value: no credential."""
    for text in (
        "('role', 'user')",
        'fields = ["api_key", "api_base"]',
        'allow_headers=["Authorization", "Content-Type"]',
        '("password", "token")',
        'if k in ("api_key", "api_base", "model"):',
        'print("password", "abc123")',
        'parser.add_argument("--api-key", "-k")',
        'x["token", "abc123"]',
        "('CreateOAuth2Token', '_'): 'create_oauth2_token',",
        '("token", "")',
        "('api_key', None)",
    ):
        assert S.text(text) == text


@pytest.mark.parametrize(
    ("template", "value"),
    [
        ("openai --api-key {s} api chat.completions.create", "{s}"),
        ("llm --api-key sk-live-{s}", "sk-live-{s}"),
        ("--token '{s}' --model gpt-4o", "{s}"),
        ('--password "two words {s}"', "two words {s}"),
        ("tool --openai-api-key\t{s}", "{s}"),
        ("run(--auth-token {s})", "{s}"),
        ("--cookie session={s} --url https://x", "session={s}"),
        ("--api-key={s}", "{s}"),
        ("--password '${s}'", "${s}"),
        ('curl -H "Authorization: Bearer {s}" https://x', "{s}"),
        ("curl --header 'x-api-key: {s}' https://x", "{s}"),
    ],
)
def test_a_key_given_to_a_command_line_flag_is_its_marker(template: str, value: str) -> None:
    """``--api-key …`` with a space: the value is the next shell word, quoted or not (``sk-live-…`` has
    no digit or capital, so no ``sk-`` shape)."""
    secret = rand(18, string.ascii_lowercase)
    out = S.text(template.format(s=secret))
    assert out == template.format(s=secret).replace(value.format(s=secret), fingerprint(value.format(s=secret)))
    assert S.text(out) == out


def test_a_flag_that_names_no_key_or_is_given_none_keeps_its_words() -> None:
    """Another flag's number, the next flag, a placeholder, a shell variable, prose about the flag."""
    for text in (
        "--max-tokens 100 --token-limit 5 --tokenizer bpe",
        "--password-file /etc/pw --secret-name prod",
        "use the --token flag to pass it",
        "pass --api-key or set OPENAI_API_KEY",
        "--api-key YOUR_API_KEY",
        "--token TOKEN",
        "--api-key $OPENAI_API_KEY",
        '--api-key "${OPENAI_API_KEY}"',
        "az login --service-principal --user $clientID --password $clientSecret",
        "--password --verbose",
        "--no-password run",
        "`--api-key` sets it",
    ):
        assert S.text(text) == text


@pytest.mark.parametrize(
    "template",
    [
        "curl -u admin:{s} https://x",
        "curl --user admin:{s} https://x",
        "curl -u 'admin:{s}' https://x",
        "curl -uadmin:{s} https://x",
        "curl https://x \\\n  -u admin:{s}",
        "curl -x http://proxy -U proxy:{s} https://x",
        "curl --proxy-user=proxy:{s} https://x",
    ],
)
def test_curl_s_user_gives_its_password_away_and_keeps_its_user(template: str) -> None:
    secret = rand(18, string.ascii_lowercase)
    out = S.text(template.format(s=secret))
    assert out == template.format(s=fingerprint(secret))
    assert S.text(out) == out


def test_curl_s_user_that_is_a_key_is_its_marker_with_its_password() -> None:
    """Stripe's docs: ``curl -u sk_test_…:``; the user is scrubbed as any text is."""
    k, password = f"sk_test_{rand(24)}", rand(12, string.ascii_lowercase)
    assert S.text(f"curl -u {k}:{password} x") == f"curl -u {fingerprint(k)}:{fingerprint(password)} x"
    assert S.text(f"curl -u {k}: x") == f"curl -u {fingerprint(k)}: x"


def test_a_user_flag_that_is_no_curl_s_or_gives_no_password_keeps_its_words() -> None:
    for text in (
        "docker run -u 1000:1000 image",
        "git push -u origin main",
        "sudo -u postgres psql -c 'select 1'",
        "curl -u admin https://x",
        'curl -u "$USER:$PASSWORD" https://x',
    ):
        assert S.text(text) == text
    assert S.text("curl -u 'admin:$ecret1' x") == f"curl -u 'admin:{fingerprint('$ecret1')}' x", "single quotes: no variable"


@pytest.mark.parametrize(
    "template",
    [
        "<pre>{{&quot;api_key&quot;: &quot;{s}&quot;}}</pre>",
        "{{&#34;token&#34;: &#34;{s}&#34;}}",
        "{{&#x27;password&#x27;: &#x27;{s}&#x27;}}",
        "&quot;headers&quot;: [[&quot;x-api-key&quot;, &quot;{s}&quot;]]",
    ],
)
def test_html_escaped_quotes_hide_no_name(template: str) -> None:
    """JSON in a web page or an HTML-escaped log: read with its quotes decoded, written as it was."""
    secret = rand(18, string.ascii_lowercase)
    out = S.text(template.format(s=secret))
    assert out == template.format(s=fingerprint(secret))
    assert S.text(out) == out
    for text in ("&quot;the token&quot;: is missing", "a &quot;quote&quot; &amp; more"):
        assert S.text(text) == text


@pytest.mark.parametrize(
    "template",
    [
        "body=model%3Dgpt-4o%26api_key%3D{s}%26stream%3Dtrue",
        "next=%2Fcb%3Fcode%3D{s}%26state%3D1",
        "api_key%3D{s}",
        "q=1&payload=password%3D{s}",
    ],
)
def test_a_url_encoded_form_in_a_value_gives_its_credentials_away(template: str) -> None:
    """A query or form URL-encoded inside another (a redirect, a logged body): the URL's names after
    ``%26`` or ``%3F``, a value up to the next ``%26``."""
    secret = rand(18, string.ascii_lowercase)
    out = S.text(template.format(s=secret))
    assert out == template.format(s=fingerprint(secret))
    assert S.text(out) == out
    for text in ("sort_key%3Dname%26max_tokens%3D5", "monkey%3Dx", "password%3D%26x"):
        assert S.text(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "environment:\n  - OPENAI_API_KEY=${OPENAI_API_KEY}\n  - MODEL=gpt-4o",
        'api_key: "${OPENAI_API_KEY}"',
        "api_key=$OPENAI_API_KEY python app.py",
        "set DB_PASSWORD=%DB_PASSWORD%",
        "password: %DB_PASSWORD%",
    ],
)
def test_a_variable_named_as_the_value_is_kept_readable(text: str) -> None:
    """A compose file's ``${OPENAI_API_KEY}``, a shell's ``$OPENAI_API_KEY``, Windows' ``%DB_PASSWORD%``
    hold no key: they became a marker (``${…}`` a marker and ``{OPENAI_API_KEY}`` after it), and the
    trace no longer said which variable the app read."""
    assert S.text(text) == text


def test_a_value_that_only_starts_like_a_variable_is_still_a_secret() -> None:
    for text, secret in (("password=$ecretPa55", "$ecretPa55"), ("api_key=$OPENAI_API_KEYx9Zq", "$OPENAI_API_KEYx9Zq")):
        assert S.text(text) == text.replace(secret, fingerprint(secret))
    assert "sk-abcDEF123456" not in S.text("api_key=${OPENAI_API_KEY:-sk-abcDEF123456}")


def test_a_variable_or_litellms_os_environ_as_a_value_in_data_is_kept() -> None:
    given = {"api_key": "os.environ/AZURE_API_KEY", "password": "${DB_PASSWORD}", "x-api-key": "$OPENAI_API_KEY", "token": "$ecret"}
    assert S.value(given) == {**given, "token": fingerprint("$ecret")}


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("mysql -h db.internal -u root -pS3cretPw litellm", "S3cretPw"),
        ("cd /srv && mysqldump -uroot -p'S3 cret!' litellm > dump.sql", "S3 cret!"),
        ("mariadb -u app -pS3cretPw", "S3cretPw"),
        ("sshpass -p S3cretPw ssh deploy@10.0.0.5", "S3cretPw"),
        ("redis-cli -h cache -p 6379 -a S3cretPw ping", "S3cretPw"),
        ("http -a alice:S3cretPw POST api.example.com/v1/x", "S3cretPw"),
        ("https --auth=alice:S3cretPw api.example.com", "S3cretPw"),
        ("docker login -u ci -p S3cretPw registry.example.com", "S3cretPw"),
        ("sqlcmd -S db.internal -U sa -P S3cretPw -Q 'SELECT 1'", "S3cretPw"),
        ("ldapsearch -x -D cn=admin,dc=ex -w S3cretPw -b dc=ex", "S3cretPw"),
        ("mongosh mongodb.internal -u app -p S3cretPw", "S3cretPw"),
    ],
)
def test_a_password_an_agent_gives_a_command_line_is_its_marker(text: str, secret: str) -> None:
    """A coding agent's tool call runs shell commands through the proxy, and each is logged: MySQL's
    ``-p<password>``, ``sshpass -p``, ``redis-cli -a`` and HTTPie's ``-a user:password`` were kept."""
    out = S.text(text)
    assert secret not in out and fingerprint(secret) in out, out
    assert out == text.replace(secret, fingerprint(secret))


def test_the_same_options_of_other_commands_keep_their_value() -> None:
    for text in (
        "mysql -u root -p litellm",  # -p alone asks for it; litellm is the database
        "mysql -h db; docker run -p8080:80 app",
        "mkdir -p /tmp/x && redis-cli ping",
        "sshpass -f ~/.pw ssh deploy@h",
        'mysql -p"$MYSQL_PWD" litellm',
        "see http://example.com -a b:c",
        "tar -a x.tar:y",
        "sqlcmd -S db -p -Q 'SELECT 1'",
        "ldapsearch -x -W -b dc=ex",
        "wc -w notes.txt | sqlcmd -i x.sql",
    ):
        assert S.text(text) == text
