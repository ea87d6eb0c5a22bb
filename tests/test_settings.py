"""Settings: runpod's bucket variable names as aliases of ours, where the bucket and region come from,
and the cached-models folder. The storage end of each case runs against the real SeaweedFS server."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from f5worker.env_values import Flag
from f5worker.errors import StorageError
from f5worker.settings import (
    VARS,
    ENV_AWS_ACCESS_KEY_ID,
    ENV_AWS_ENDPOINT_URL,
    ENV_AWS_CA_BUNDLE,
    ENV_AWS_REGION,
    ENV_AWS_SECRET_ACCESS_KEY,
    ENV_BUCKET_ACCESS_KEY_ID,
    ENV_BUCKET_ENDPOINT_URL,
    ENV_BUCKET_SECRET_ACCESS_KEY,
    ENV_S3_BUCKET,
    ENV_VOLUME_PATH,
    RUNPOD_CACHED_MODELS_SUBDIR,
    S3_ENV_ALIASES,
    Settings,
    region_from_endpoint,
    split_bucket_endpoint,
)
from s3_utils import make_storage
from tests.processes import REPO
from tests.helpers import SETTING_LIMITS

SECRET = "sekrit-" + uuid.uuid4().hex
OTHER_SECRET = "other-" + uuid.uuid4().hex


def runpod_names(s3_env) -> dict[str, str]:
    """The same bucket and keys as ``s3_env``, under runpod's names only (bucket in the URL path)."""
    return {ENV_BUCKET_ENDPOINT_URL: f"{s3_env[ENV_AWS_ENDPOINT_URL]}/{s3_env.bucket}",
            ENV_BUCKET_ACCESS_KEY_ID: s3_env[ENV_AWS_ACCESS_KEY_ID],
            ENV_BUCKET_SECRET_ACCESS_KEY: s3_env[ENV_AWS_SECRET_ACCESS_KEY]}


# --- the aliases against real storage ----------------------------------------------------------------

def test_runpod_names_alone_reach_the_bucket(s3_env):
    settings = Settings.from_env(runpod_names(s3_env))
    assert (settings.s3_bucket, settings.aws_endpoint_url) == (s3_env.bucket, s3_env[ENV_AWS_ENDPOINT_URL])
    assert settings.warnings == ()
    storage = make_storage(settings)
    storage.probe()  # write, read, delete under logs/
    assert s3_env.bucket in storage.describe()


def test_ours_win_when_both_are_set_and_the_difference_is_named_without_values(s3_env):
    env = {**s3_env, ENV_BUCKET_ACCESS_KEY_ID: "AKIA" + uuid.uuid4().hex[:16].upper(),
           ENV_BUCKET_SECRET_ACCESS_KEY: OTHER_SECRET}
    settings = Settings.from_env(env)
    assert settings.aws_secret_access_key == s3_env[ENV_AWS_SECRET_ACCESS_KEY]
    make_storage(settings).probe()  # the winning pair is the one that works
    assert settings.warnings == (
        f"{ENV_AWS_ACCESS_KEY_ID} and {ENV_BUCKET_ACCESS_KEY_ID} are both set and differ; {ENV_AWS_ACCESS_KEY_ID} is used.",
        f"{ENV_AWS_SECRET_ACCESS_KEY} and {ENV_BUCKET_SECRET_ACCESS_KEY} are both set and differ; "
        f"{ENV_AWS_SECRET_ACCESS_KEY} is used.",
    )
    text = " ".join(settings.warnings)
    for value in (OTHER_SECRET, env[ENV_BUCKET_ACCESS_KEY_ID], s3_env[ENV_AWS_SECRET_ACCESS_KEY]):
        assert value not in text


def test_the_same_value_under_both_names_is_no_conflict(s3_env):
    settings = Settings.from_env({**s3_env, **runpod_names(s3_env)})
    assert settings.warnings == ()
    assert settings.s3_bucket == s3_env.bucket


def test_a_wrong_alias_secret_is_what_fails_when_ours_is_unset(s3_env):
    env = {**runpod_names(s3_env), ENV_BUCKET_SECRET_ACCESS_KEY: OTHER_SECRET}
    with pytest.raises(StorageError) as err:
        make_storage(Settings.from_env(env)).probe()
    assert OTHER_SECRET not in str(err.value)


# --- which bucket, which endpoint ------------------------------------------------------------------

KEYS = {ENV_AWS_ACCESS_KEY_ID: "AKIAEXAMPLEEXAMPLE", ENV_AWS_SECRET_ACCESS_KEY: "example-secret"}


@pytest.mark.parametrize("url, endpoint, bucket", [
    ("https://s3.us-west-004.backblazeb2.com/voices-bkt", "https://s3.us-west-004.backblazeb2.com", "voices-bkt"),
    ("https://voices-bkt.s3.us-west-004.backblazeb2.com", "https://s3.us-west-004.backblazeb2.com", "voices-bkt"),
    ("https://my.dotted.bucket.s3.eu-central-1.amazonaws.com", "https://s3.eu-central-1.amazonaws.com",
     "my.dotted.bucket"),
    ("https://voices-bkt.nyc3.digitaloceanspaces.com", "https://nyc3.digitaloceanspaces.com", "voices-bkt"),
    ("http://127.0.0.1:9000/voices-bkt/", "http://127.0.0.1:9000", "voices-bkt"),
    # no bucket in these: the URL is the endpoint (an R2 host's first label is the account, not a bucket)
    ("https://s3.us-west-004.backblazeb2.com", "https://s3.us-west-004.backblazeb2.com", None),
    ("https://0123456789abcdef.r2.cloudflarestorage.com", "https://0123456789abcdef.r2.cloudflarestorage.com", None),
    ("http://minio.internal:9000", "http://minio.internal:9000", None),
])
def test_bucket_endpoint_forms(url, endpoint, bucket):
    assert split_bucket_endpoint(url) == (endpoint, bucket)
    settings = Settings.from_env({ENV_BUCKET_ENDPOINT_URL: url, **KEYS})
    assert (settings.aws_endpoint_url, settings.s3_bucket) == (endpoint, bucket)
    with_bucket = Settings.from_env({ENV_BUCKET_ENDPOINT_URL: url, ENV_S3_BUCKET: bucket or "named", **KEYS})
    assert with_bucket.s3_bucket == (bucket or "named") and with_bucket.warnings == ()


def test_an_endpoint_that_names_no_bucket_says_storage_stays_local():
    settings = Settings.from_env({ENV_BUCKET_ENDPOINT_URL: "https://s3.us-west-004.backblazeb2.com"})
    assert settings.s3_bucket is None
    (note,) = settings.warnings
    assert note.startswith(f"{ENV_BUCKET_ENDPOINT_URL} is set but names no bucket") and ENV_S3_BUCKET in note


def test_s3_bucket_wins_over_the_bucket_in_the_url():
    settings = Settings.from_env({ENV_BUCKET_ENDPOINT_URL: "https://a.s3.us-east-1.amazonaws.com",
                                  ENV_S3_BUCKET: "b", **KEYS})
    assert (settings.s3_bucket, settings.aws_endpoint_url) == ("b", "https://s3.us-east-1.amazonaws.com")
    assert settings.warnings == (f"{ENV_S3_BUCKET} and the bucket named in {ENV_BUCKET_ENDPOINT_URL} differ; "
                                 f"{ENV_S3_BUCKET} is used.",)


def test_our_endpoint_wins_and_then_the_alias_url_names_no_bucket():
    settings = Settings.from_env({ENV_BUCKET_ENDPOINT_URL: "https://a.s3.us-east-1.amazonaws.com",
                                  ENV_AWS_ENDPOINT_URL: "http://127.0.0.1:9000"})
    assert (settings.aws_endpoint_url, settings.s3_bucket) == ("http://127.0.0.1:9000", None)
    differ, unused = settings.warnings
    assert differ.startswith(f"{ENV_AWS_ENDPOINT_URL} and {ENV_BUCKET_ENDPOINT_URL} are both set and differ")
    assert unused.startswith(f"{ENV_BUCKET_ENDPOINT_URL} is set but names a bucket, which is not used")


@pytest.mark.parametrize("ours", ["https://s3.us-west-004.backblazeb2.com/", "HTTPS://S3.us-west-004.Backblazeb2.com",
                                  "https://s3.us-west-004.backblazeb2.com:443"])
def test_our_endpoint_written_otherwise_is_the_same_endpoint(ours):
    """A trailing '/', a host or scheme in capitals or the default port written out: the same
    endpoint, so the bucket the alias names is used (it was 'differ', and no bucket: local storage)."""
    settings = Settings.from_env({ENV_BUCKET_ENDPOINT_URL: "https://s3.us-west-004.backblazeb2.com/bkt",
                                  ENV_AWS_ENDPOINT_URL: ours, **KEYS})
    assert settings.s3_bucket == "bkt" and settings.warnings == ()


@pytest.mark.parametrize("url, reason", [
    ("ftp://host/bucket", "its scheme https or http"),
    ("https://host/bucket/extra", "with a path of at most one name, the bucket's"),
    ("https://host/bucket?x=1", "with no query or fragment"),
    ("not a url", "its scheme https or http"),
    ("https://user:hunter2-password@host/a/b", "with no user name or password"),
    # a password in the endpoint is in every presigned audio_url the worker hands out
    ("https://alice:hunter2@127.0.0.1:9000/bkt", "with no user name or password"),
    ("https://alice:hunter2@bkt.s3.us-west-004.backblazeb2.com", "with no user name or password"),
    ("https://127.0.0.1:abc", "a port that is a number from 1 to 65535"),
    ("https://127.0.0.1:hunter2/bkt", "a port that is a number from 1 to 65535"),
    ("https://127.0.0.1:99999/bkt", "a port that is a number from 1 to 65535"),
    ("https://[::1/bkt", "a port that is a number from 1 to 65535"),
])
def test_an_unusable_bucket_url_stops_start_up_without_repeating_it(url, reason):
    with pytest.raises(ValueError) as err:
        Settings.from_env({ENV_BUCKET_ENDPOINT_URL: url, **KEYS})
    message = str(err.value)
    assert message.startswith(f"{ENV_BUCKET_ENDPOINT_URL} must look like ") and reason in message, message
    assert "hunter2" not in message


@pytest.mark.parametrize("url, region", [
    ("https://s3.us-west-004.backblazeb2.com", "us-west-004"),
    ("https://s3.eu-central-1.amazonaws.com", "eu-central-1"),
    ("https://s3.eu-central-2.wasabisys.com", "eu-central-2"),
    ("https://ams3.digitaloceanspaces.com", "ams3"),
    ("https://s3.amazonaws.com", None),
    ("https://s3.dualstack.us-east-1.amazonaws.com", None),
    ("https://s3.localhost.localstack.cloud", None),
    ("https://0123456789abcdef.r2.cloudflarestorage.com", None),
    ("http://127.0.0.1:9000", None),
    (None, None),
])
def test_region_from_the_endpoint_host(url, region):
    assert region_from_endpoint(url) == region


def test_aws_region_wins_over_the_endpoint_host():
    env = {ENV_AWS_ENDPOINT_URL: "https://s3.us-west-004.backblazeb2.com"}
    assert Settings.from_env(env).aws_region == "us-west-004"
    assert Settings.from_env({**env, ENV_AWS_REGION: "eu-central-003"}).aws_region == "eu-central-003"


def test_every_alias_is_the_runpod_sdks_own_name():
    """The names runpod's upload helper reads, spelled as its source spells them."""
    import inspect

    from runpod.serverless.utils import rp_upload

    source = inspect.getsource(rp_upload.get_boto_client)
    for alias in S3_ENV_ALIASES.values():
        assert f'"{alias}"' in source, alias


# --- RunPod's cached models ----------------------------------------------------------------------

def test_cached_models_folder_is_under_the_volume_mount_point(tmp_path):
    assert Settings.from_env({}).runpod_model_cache == Path("/runpod-volume/huggingface-cache/hub")
    settings = Settings.from_env({ENV_VOLUME_PATH: str(tmp_path)})
    assert settings.runpod_model_cache == tmp_path / RUNPOD_CACHED_MODELS_SUBDIR


def test_graph_memory_budget_is_a_whole_number_of_mib():
    from f5worker.settings import ENV_GRAPH_MEMORY_MB

    assert Settings.from_env({}).graph_memory_mb == 1024
    assert Settings.from_env({ENV_GRAPH_MEMORY_MB: "256"}).graph_memory_mb == 256
    for bad in ("0", "1.5", "lots"):
        with pytest.raises(ValueError, match=ENV_GRAPH_MEMORY_MB):
            Settings.from_env({ENV_GRAPH_MEMORY_MB: bad})


@pytest.mark.parametrize("raw, ok", [("604800", True), ("604801", False), ("1000000", False), ("1e23", False),
                                     ("0", False)])
def test_presign_expiry_is_at_most_a_week(raw, ok):
    from f5worker.settings import ENV_PRESIGN_EXPIRY

    if ok:
        assert Settings.from_env({ENV_PRESIGN_EXPIRY: raw}).presign_expiry == int(raw)
    else:
        with pytest.raises(ValueError, match=ENV_PRESIGN_EXPIRY):
            Settings.from_env({ENV_PRESIGN_EXPIRY: raw})


# --- settings that would break every job are refused at start -------------------------------------


@pytest.mark.parametrize("name, at_limit, past_limit", SETTING_LIMITS)
def test_numbers_are_bounded_above(name, at_limit, past_limit):
    """S3_READ_TIMEOUT_SECONDS=1e308 started and failed every job (the socket timeout overflows)."""
    assert Settings.from_env({name: at_limit})
    with pytest.raises(ValueError) as err:
        Settings.from_env({name: past_limit})
    assert str(err.value) == f"{name} must be at most {float(at_limit):g}, not {past_limit!r}"


@pytest.mark.parametrize("url", ["https://host/advb", "https://host/advb/", "https://host?x=1", "s3://host",
                                 "https://:9000", "https://host:port", "https://user:hunter2@host",
                                 "ftp://host"])
def test_an_endpoint_followed_by_a_bucket_name_is_refused_without_repeating_it(url):
    """With the bucket's name as its path, botocore put every object under it inside the bucket
    (advb/voices/...)."""
    with pytest.raises(ValueError) as err:
        Settings.from_env({ENV_AWS_ENDPOINT_URL: url, ENV_S3_BUCKET: "voices", **KEYS})
    assert str(err.value).startswith(f"{ENV_AWS_ENDPOINT_URL} must be the S3 endpoint alone")
    assert "hunter2" not in str(err.value) and "advb" not in str(err.value)
    says_bucket = "bucket's name" in str(err.value)
    assert says_bucket == (url in ("https://host/advb", "https://host/advb/")), str(err.value)  # the reason given


@pytest.mark.parametrize("url", ["https://s3.us-west-004.backblazeb2.com", "https://host:9000/", "http://127.0.0.1:9000",
                                 "https://project.supabase.co/storage/v1/s3"])
def test_an_endpoint_is_kept_as_given(url):
    """A path of several names is an endpoint's own (Supabase's S3 API)."""
    settings = Settings.from_env({ENV_AWS_ENDPOINT_URL: url, ENV_S3_BUCKET: "voices", **KEYS})
    assert settings.aws_endpoint_url == url
    assert Settings.from_env({ENV_AWS_ENDPOINT_URL: "https://host/advb"}).s3_bucket is None  # no bucket: unused


@pytest.mark.parametrize("device, ok", [("cpu", True), ("cuda", True), ("cuda:1", True), ("cpu:0", False),
                                        ("banana", False), ("cuda:", False), ("CUDA", False), ("", True)])
def test_device_is_one_the_models_can_load_on(device, ok):
    from f5worker.settings import ENV_DEVICE

    if ok:
        assert Settings.from_env({ENV_DEVICE: device}).device == (device or None)
    else:
        with pytest.raises(ValueError, match=f"^{ENV_DEVICE} must be cpu, cuda or cuda:<index>"):
            Settings.from_env({ENV_DEVICE: device})


@pytest.mark.parametrize("keys", [{}, {ENV_AWS_ACCESS_KEY_ID: "AKIAEXAMPLEEXAMPLE"},
                                  {ENV_BUCKET_SECRET_ACCESS_KEY: "example-secret"}])
def test_a_bucket_without_its_key_pair_is_refused(keys):
    """Without keys botocore would look elsewhere, the instance metadata address among them."""
    with pytest.raises(ValueError) as err:
        Settings.from_env({ENV_S3_BUCKET: "voices", **keys})
    assert str(err.value).startswith(f"a bucket is set ({ENV_S3_BUCKET} or {ENV_BUCKET_ENDPOINT_URL}) but ")
    assert "example-secret" not in str(err.value)
    assert Settings.from_env({ENV_S3_BUCKET: "voices", **KEYS}).s3_bucket == "voices"


# --- the rows: each setting declared once ------------------------------------------------------------

FLAG_FIELDS = [name for name, var in VARS.items() if isinstance(var.parse, Flag)]


@pytest.mark.parametrize("name", FLAG_FIELDS)
def test_a_flag_refuses_a_word_it_does_not_know(name):
    env = VARS[name].env
    for word, value in (("1", True), ("On", True), ("yes", True), ("0", False), ("FALSE", False), ("off", False)):
        assert getattr(Settings.from_env({env: word}), name) is value
    for typo in ("flase", "2", "enabled", "nope"):
        with pytest.raises(ValueError, match=f"^{env} must be one of"):
            Settings.from_env({env: typo})


def test_the_fast_path_typo_no_longer_turns_it_on():
    with pytest.raises(ValueError, match="F5_FAST_PATH"):
        Settings.from_env({"F5_FAST_PATH": "flase"})


def test_every_field_but_the_notes_has_one_row_and_each_variable_one_field():
    from dataclasses import fields

    assert {f.name for f in fields(Settings)} - set(VARS) == {"warnings"}
    names = [var.env for var in VARS.values()]
    assert len(names) == len(set(names))


def test_every_default_is_what_an_empty_environment_gives():
    settings = Settings.from_env({})
    derived = {"model_root", "local_storage_dir"}  # computed from the volume at start
    for name, var in VARS.items():
        if name not in derived:
            assert getattr(settings, name) == var.default, name


def test_the_readme_table_is_the_rows():
    from f5worker.settings import markdown_table

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme, "regenerate it: python -m f5worker.settings --markdown"


def test_the_table_prints_from_the_command_line(capsys):
    from f5worker.settings import main, markdown_table

    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == markdown_table() + "\n"


@pytest.mark.parametrize("blank", [ENV_AWS_ACCESS_KEY_ID, ENV_BUCKET_ACCESS_KEY_ID, ENV_AWS_SECRET_ACCESS_KEY])
def test_a_key_of_spaces_alone_is_no_key(blank):
    """It passed the bucket-needs-both-keys check, then reached boto3 as no key (botocore would look
    for credentials elsewhere); the gate's storage check failed with a TypeError."""
    env = {ENV_S3_BUCKET: "bucket", ENV_AWS_ACCESS_KEY_ID: "AKIAEXAMPLE", ENV_AWS_SECRET_ACCESS_KEY: "secret"}
    if blank == ENV_BUCKET_ACCESS_KEY_ID:
        env.pop(ENV_AWS_ACCESS_KEY_ID)
    env[blank] = "   "
    with pytest.raises(ValueError, match="a bucket is set .* but AWS_"):
        Settings.from_env(env)


@pytest.mark.parametrize("bundle", ["", " {file}", "{file} ", "{missing}"])
def test_a_ca_bundle_botocore_cannot_use_stops_start_up(tmp_path, bundle):
    """botocore reads AWS_CA_BUNDLE itself, as it is: empty, it stopped the S3 client
    (InvalidConfigError); a missing file, or one with a space before it, failed each call as a TLS
    handshake that blamed AWS_ENDPOINT_URL."""
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    value = bundle.format(file=pem, missing=tmp_path / "missing.pem")
    with pytest.raises(ValueError) as err:
        Settings.from_env({ENV_S3_BUCKET: "voices", **KEYS, ENV_AWS_CA_BUNDLE: value})
    assert str(err.value).startswith(f"{ENV_AWS_CA_BUNDLE} must name a CA certificate file that exists")
    assert Settings.from_env({ENV_S3_BUCKET: "voices", **KEYS, ENV_AWS_CA_BUNDLE: str(pem)}).s3_bucket == "voices"
    assert Settings.from_env({ENV_AWS_CA_BUNDLE: value}).s3_bucket is None  # no bucket: nothing reads it


@pytest.mark.parametrize("region, ok", [("us-east-1", True), ("eu-central-003", True), ("auto", True),
                                        ("us west 1", False), ("us_east_1", False), ("-x", False)])
def test_a_region_botocore_refuses_stops_start_up(region, ok):
    env = {ENV_S3_BUCKET: "voices", **KEYS, ENV_AWS_REGION: region}
    if ok:
        assert Settings.from_env(env).aws_region == region
    else:
        with pytest.raises(ValueError, match=f"^{ENV_AWS_REGION} must be a region name such as us-east-1"):
            Settings.from_env(env)


def test_a_region_that_contradicts_the_endpoints_host_warns_by_name():
    env = {ENV_S3_BUCKET: "voices", **KEYS, ENV_AWS_ENDPOINT_URL: "https://s3.us-west-004.backblazeb2.com"}
    assert Settings.from_env({**env, ENV_AWS_REGION: "us-west-004"}).warnings == ()
    settings = Settings.from_env({**env, ENV_AWS_REGION: "us-east-1"})
    assert settings.aws_region == "us-east-1"  # the operator's choice stands
    assert settings.warnings == (f"{ENV_AWS_REGION} differs from the region the endpoint's host names; requests "
                                 f"are signed for {ENV_AWS_REGION}, which a provider may refuse: unset it or make "
                                 "it the host's.",)


def test_s3_checks_wait_for_a_bucket_and_an_unused_alias_is_a_note():
    """A worker on local storage starts whatever AWS_REGION other tools in its environment use;
    a BUCKET_ENDPOINT_URL that AWS_ENDPOINT_URL overrides is noted, not a reason to stop."""
    assert Settings.from_env({ENV_AWS_REGION: "us_east_1"}).aws_region == "us_east_1"
    settings = Settings.from_env({ENV_S3_BUCKET: "voices", **KEYS, ENV_AWS_ENDPOINT_URL: "https://s3.example.com",
                                  ENV_BUCKET_ENDPOINT_URL: "https://user:hunter2@s3.example.com/voices"})
    assert settings.s3_bucket == "voices" and settings.aws_endpoint_url == "https://s3.example.com"
    [note] = settings.warnings
    assert note.startswith(f"{ENV_BUCKET_ENDPOINT_URL} must look like ") and "hunter2" not in note
    assert note.endswith(f"; it is not used, as {ENV_AWS_ENDPOINT_URL} is set.")


def test_one_setting_is_read_alone_and_its_own_bad_value_gives_its_default():
    """What a worker whose settings were refused still needs: another variable's fault is not its own."""
    from f5worker.settings import ENV_MAX_CONCURRENCY, ENV_STREAMING, read_alone

    assert read_alone("streaming", {ENV_STREAMING: " 1 ", ENV_MAX_CONCURRENCY: "many"}) is True
    assert read_alone("streaming", {ENV_STREAMING: "sometimes"}) is False
    assert read_alone("max_concurrency", {ENV_MAX_CONCURRENCY: "many"}) == VARS["max_concurrency"].default


@pytest.mark.parametrize("url", ["https://key:pa[ss]word@s3.example.com", "https://s3.example.com]"])
def test_an_endpoint_that_does_not_parse_stops_nothing_it_is_not_used_by_and_is_never_quoted(url):
    """With no bucket the endpoint is not used; it stopped the worker all the same, with urllib's
    sentence quoting the bracketed part of its password ("'ss' does not appear to be an IPv4 or
    IPv6 address") and naming no variable. With a bucket it is refused naming the variable only."""
    assert Settings.from_env({ENV_AWS_ENDPOINT_URL: url}).s3_bucket is None
    assert region_from_endpoint(url) is None
    keys = {ENV_S3_BUCKET: "b", ENV_AWS_ACCESS_KEY_ID: "k", ENV_AWS_SECRET_ACCESS_KEY: "s"}
    with pytest.raises(ValueError) as refused:
        Settings.from_env({ENV_AWS_ENDPOINT_URL: url, **keys})
    assert str(refused.value).startswith(f"{ENV_AWS_ENDPOINT_URL} must be the S3 endpoint alone")
    assert "ss" not in str(refused.value).replace("address", "")


def test_a_path_setting_too_long_to_look_up_is_refused_or_taken_as_absent(tmp_path):
    """A part over 255 bytes raised OSError (File name too long) out of Settings.from_env: a
    traceback at start instead of the sentence naming the variable."""
    keys = {ENV_S3_BUCKET: "b", ENV_AWS_ACCESS_KEY_ID: "k", ENV_AWS_SECRET_ACCESS_KEY: "s"}
    with pytest.raises(ValueError, match=f"^{ENV_AWS_CA_BUNDLE} must name a CA certificate file that exists"):
        Settings.from_env({**keys, ENV_AWS_CA_BUNDLE: str(tmp_path / ("x" * 300))})
    settings = Settings.from_env({ENV_VOLUME_PATH: str(tmp_path / ("v" * 300))})  # no volume there, as for any absent path
    assert not settings.volume_mounted and settings.local_storage_dir == Path("storage").resolve()


def test_runpod_logs_are_quiet_unless_a_level_is_set():
    """At runpod's default level (DEBUG) it logs every job's text and presigned URLs."""
    from f5worker.settings import quiet_runpod_logs

    env: dict = {}
    quiet_runpod_logs(env)
    assert env == {"RUNPOD_LOG_LEVEL": "INFO"}
    for chosen in ({"RUNPOD_LOG_LEVEL": "DEBUG"}, {"RUNPOD_DEBUG_LEVEL": "WARN"}):
        env = dict(chosen)
        quiet_runpod_logs(env)
        assert env == chosen
