"""Every setting Lockstep reads, with its unit and default: the one configuration reference.

Settings are read once from the environment at the edge (the CLI), frozen, and passed down.
Nothing deeper reads ``os.environ``. Seed names (``INITIAL_MODEL_REPO_ID``, ``HF_HOME``, ...) are kept;
new settings use the ``LOCKSTEP_`` prefix.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class UpdateMode(str, Enum):
    """How a replica replaces its model: hold two copies (swap) or copy weights into the live one."""

    SWAP = "swap"
    INPLACE = "inplace"


class EngineKind(str, Enum):
    """Which engine serves: vLLM when it is installed and supports the device (auto), or one named."""

    AUTO = "auto"
    VLLM = "vllm"
    BUILTIN = "builtin"


class CommitPolicy(str, Enum):
    """What a coordinator does when some replicas fail to stage."""

    STRICT = "strict"  # abort for everyone
    QUORUM = "quorum"  # commit anyway; failed replicas go unready until they catch up


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class Settings(BaseSettings):
    """Lockstep configuration. Each field names its environment variable, unit and default."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    # --- models ----------------------------------------------------------------------------------------
    initial_model_repo_id: str = Field(
        "builtin:tiny", validation_alias=_env("INITIAL_MODEL_REPO_ID"),
        description="Model a replica boots with when nothing was committed: repo id, local dir, versions/N "
        "or builtin:tiny[-sN]/builtin:mid[-sN].",
    )
    initial_model: str = Field("builtin:tiny", validation_alias=_env("INITIAL_MODEL"),
                               description="Simulation run: the model it switches from.")
    substitute_model: str = Field("builtin:tiny-s1", validation_alias=_env("SUBSTITUTE_MODEL"),
                                  description="Simulation run: the model it switches to.")
    hf_home: Path | None = Field(None, validation_alias=_env("HF_HOME"),
                                 description="Hugging Face cache; default <shared>/hf_home, else ~/.cache/huggingface.")
    hf_hub_offline: bool = Field(False, validation_alias=_env("HF_HUB_OFFLINE"),
                                 description="Never contact the hub; repo ids must be in the cache.")
    builtin_dir: Path | None = Field(None, validation_alias=_env("LOCKSTEP_BUILTIN_DIR"),
                                     description="Where builtin:* models are built; default <shared>/builtin, "
                                     "else ~/.cache/lockstep/builtin.")
    trust_remote_code: bool = Field(False, validation_alias=_env("LOCKSTEP_TRUST_REMOTE_CODE"),
                                    description="Allow repos that ship Python code (off: such repos are refused).")
    allow_pickle: bool = Field(False, validation_alias=_env("LOCKSTEP_ALLOW_PICKLE"),
                               description="Allow pickle checkpoints (*.bin, *.pt); off: safetensors only.")
    device: str = Field("auto", validation_alias=_env("LOCKSTEP_DEVICE"),
                        description="auto | cpu | cuda | cuda:N.")
    dtype: str = Field("auto", validation_alias=_env("LOCKSTEP_DTYPE"),
                       description="Serving dtype: auto (bfloat16 on CUDA, float16 where it lacks bf16; on a CPU "
                       "bfloat16 where it has AMX-BF16 or AVX512-BF16, else float32) | float32 | float16 | bfloat16. "
                       "A commit needs every replica's weights digest, dtype included, to agree: on mixed hardware "
                       "name one. The trainer trains in float32 whatever this says.")

    # --- shared storage and sync ---------------------------------------------------------------------
    shared_dir: Path | None = Field(None, validation_alias=_env("LOCKSTEP_SHARED_DIR"),
                                    description="The shared volume (/models in Kubernetes). Unset: no cluster sync.")
    sync_state_file: Path | None = Field(None, validation_alias=_env("SYNC_STATE_FILE"),
                                         description="Default <shared>/sync_state.json.")
    poll_interval_s: float = Field(0.1, gt=0, le=60, validation_alias=_env("LOCKSTEP_POLL_INTERVAL_S"),
                                   description="Seconds between reads of sync_state.json.")
    commit_poll_interval_s: float = Field(
        0.02, gt=0, le=60, validation_alias=_env("LOCKSTEP_COMMIT_POLL_INTERVAL_S"),
        description="Seconds between reads of sync_state.json while a replica that staged waits for the commit "
        "(at most 15 s); lets the coordinator use a shorter commit margin. Set it to the poll interval to turn it off.")
    heartbeat_interval_s: float = Field(0.5, gt=0, le=60, validation_alias=_env("LOCKSTEP_HEARTBEAT_INTERVAL_S"),
                                        description="Seconds between heartbeat writes.")
    heartbeat_ttl_s: float = Field(5.0, gt=0, validation_alias=_env("LOCKSTEP_HEARTBEAT_TTL_S"),
                                   description="A heartbeat older than this (seconds) means the replica is gone.")
    update_mode: UpdateMode = Field(UpdateMode.SWAP, validation_alias=_env("LOCKSTEP_UPDATE_MODE"),
                                    description="swap (two models while staging) | inplace (copy into live model).")
    commit_policy: CommitPolicy = Field(CommitPolicy.STRICT, validation_alias=_env("LOCKSTEP_COMMIT_POLICY"),
                                        description="strict | quorum.")
    sync_mode: str = Field("two-phase", pattern="^(two-phase|naive)$", validation_alias=_env("LOCKSTEP_SYNC_MODE"),
                           description="two-phase (the protocol) | naive (the seed's design: each replica flips on "
                           "its own when its load finishes; a benchmark baseline, not for production).")
    stage_timeout_s: float = Field(600.0, gt=0, validation_alias=_env("LOCKSTEP_STAGE_TIMEOUT_S"),
                                   description="Seconds a coordinator waits for every replica to stage.")
    session_ttl_s: float = Field(
        3600.0, gt=0, le=30 * 86400, validation_alias=_env("LOCKSTEP_SESSION_TTL_S"),
        description="Seconds a replica remembers which version answered a session (X-Lockstep-Session or the "
        "OpenAI user field); a session idle longer may change version at the next rollout step.")
    session_table_size: int = Field(
        100_000, ge=0, le=10_000_000, validation_alias=_env("LOCKSTEP_SESSION_TABLE_SIZE"),
        description="Sessions a replica remembers (the oldest forgotten first); about 100 bytes each.")
    session_pin_wait_s: float = Field(
        2.0, ge=0, le=60, validation_alias=_env("LOCKSTEP_SESSION_PIN_WAIT_S"),
        description="Seconds a session request drawn into a rollout step's new share waits for the fleet's list "
        "of sessions kept on the committed version, before it goes by its draw alone.")
    commit_margin_s: float = Field(
        0.1, gt=0, validation_alias=_env("LOCKSTEP_COMMIT_MARGIN_S"),
        description="activate_at = commit + this (seconds), raised to 2 polls + 50 ms of the slowest-polling staged "
        "replica (the commit poll interval while it waits, else the poll interval).")
    lease_ttl_s: float = Field(30.0, gt=0, validation_alias=_env("LOCKSTEP_LEASE_TTL_S"),
                               description="Coordinator lease lifetime in seconds; a stale lease is taken over.")
    keep_versions: int = Field(5, ge=1, validation_alias=_env("LOCKSTEP_KEEP_VERSIONS"),
                               description="Garbage collection keeps the committed, served and N newest versions.")
    coordinator_url: str | None = Field(
        None, validation_alias=_env("LOCKSTEP_COORDINATOR_URL"),
        description="Replica without a shared folder: the trainer URL it asks for the committed version at boot "
        "(unready until it serves it) and downloads published versions/N from (into LOCKSTEP_VERSIONS_DIR).",
    )
    versions_dir: Path | None = Field(
        None, validation_alias=_env("LOCKSTEP_VERSIONS_DIR"),
        description="Replica: the local folder where it assembles the versions it stages from chunks (its own, never "
        "shared: it copies unchanged chunks from there); default <HF_HOME>/lockstep-versions without a shared "
        "folder, else <temp>/lockstep-versions/<replica id>. Room for LOCKSTEP_KEEP_VERSIONS + 1 copies.",
    )
    trainer_data_dir: Path | None = Field(
        None, validation_alias=_env("LOCKSTEP_TRAINER_DATA_DIR"),
        description="Trainer without a shared folder: its runs, versions, publish history and committed state; "
        "default ~/.local/share/lockstep/trainer. Put it on a volume to keep them across restarts.",
    )

    # --- replica -------------------------------------------------------------------------------------
    replica_id: str | None = Field(None, validation_alias=AliasChoices("LOCKSTEP_REPLICA_ID", "POD_NAME", "HOSTNAME"),
                                   description="This replica's name in heartbeats; default: POD_NAME/HOSTNAME.")
    advertise_url: str | None = Field(None, validation_alias=AliasChoices("LOCKSTEP_ADVERTISE_URL"),
                                      description="URL other processes reach this replica at; default from host/port "
                                      "or POD_IP.")
    pod_ip: str | None = Field(None, validation_alias=_env("POD_IP"), description="Set by the Downward API.")
    max_batch_size: int = Field(0, ge=0, le=1024, validation_alias=_env("LOCKSTEP_MAX_BATCH_SIZE"),
                                description="Sequences decoded together in one forward pass (built-in engine; "
                                "each reserves paged KV-cache blocks for its prompt plus max_tokens when admitted). "
                                "N: up to N, with a cache of N full contexts. 0: a cache sized from memory at engine "
                                "start, an eighth of the free RAM (CPU; the replicas of a host size theirs one after "
                                "the other) or 40% of the free GPU memory, 16..128 full contexts on a CPU and "
                                "16..256 on a GPU, shared by up to 128 (CPU) or 256 (GPU) sequences; the log says "
                                "what it chose. vLLM: its max_num_seqs (0: vLLM's default).")
    max_queue: int = Field(256, ge=1, validation_alias=_env("LOCKSTEP_MAX_QUEUE"),
                           description="Requests waiting for a batch slot; beyond it 429.")
    step_prefill_tokens: int = Field(0, ge=0, validation_alias=_env("LOCKSTEP_STEP_PREFILL_TOKENS"),
                                     description="Prompt tokens prefilled per decode step while a batch runs "
                                     "(0: 32 on CPU, 2048 on GPU); larger admits bursts faster, smaller keeps "
                                     "running streams steadier.")
    interleave_prefill: bool = Field(False, validation_alias=_env("LOCKSTEP_INTERLEAVE_PREFILL"),
                                     description="Built-in engine: requests arriving during a decode step join "
                                     "the next step's forward pass (false: the weights are read once for both, "
                                     "more tokens per second under load) or are prefilled between the running "
                                     "step's layers (true: their first token comes sooner, at one more pass over "
                                     "the weights per wave).")
    prefill_chunk_tokens: int = Field(0, ge=-1, validation_alias=_env("LOCKSTEP_PREFILL_CHUNK_TOKENS"),
                                      description="A prompt longer than this is prefilled this many tokens per "
                                      "decode step while a batch runs, instead of stalling one step for all of it "
                                      "(0: 256 on CPU, 2048 on GPU; -1: off).")
    engine: EngineKind = Field(EngineKind.AUTO, validation_alias=_env("LOCKSTEP_ENGINE"),
                               description="auto (vLLM when it is installed and supports the device, else the "
                               "built-in engine) | vllm | builtin.")
    vllm_kv_cache_gib: float = Field(1.0, gt=0, le=4096, validation_alias=_env("LOCKSTEP_VLLM_KV_CACHE_GIB"),
                                     description="vLLM on CPU: KV cache per engine in GiB (swap mode holds two "
                                     "engines while staging).")
    vllm_gpu_memory_utilization: float = Field(
        0.0, ge=0, le=1, validation_alias=_env("LOCKSTEP_VLLM_GPU_MEMORY_UTILIZATION"),
        description="vLLM on GPU: share of GPU memory one engine takes, weights and KV cache (0: 0.45 in swap mode, "
        "where two engines must fit while staging; 0.9 in inplace mode).")
    vllm_enforce_eager: str = Field("auto", pattern="^(auto|true|false)$",
                                    validation_alias=_env("LOCKSTEP_VLLM_ENFORCE_EAGER"),
                                    description="auto (eager on CPU: starts in about a minute instead of several; "
                                    "compiled with CUDA graphs on GPU) | true | false.")
    vllm_cpu_threads_bind: str = Field("", max_length=256, validation_alias=_env("LOCKSTEP_VLLM_CPU_THREADS_BIND"),
                                       description="vLLM on CPU: VLLM_CPU_OMP_THREADS_BIND for each engine (auto, "
                                       "nobind, or core ids like 0-3); empty: vLLM's default.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, validation_alias=_env("LOCKSTEP_TENSOR_PARALLEL_SIZE"),
                                      description="vLLM: GPUs one engine shards the model across (tensor "
                                      "parallelism); the pod must request that many GPUs.")
    vllm_args: str = Field("", max_length=16_384, validation_alias=_env("LOCKSTEP_VLLM_ARGS"),
                           description="vLLM: a JSON object of further AsyncEngineArgs (e.g. "
                           "'{\"max_num_batched_tokens\": 8192}'); options vLLM does not have stop the replica at "
                           "start, values it rejects fail the load with its message in /status last_error.")
    max_new_tokens_limit: int = Field(1024, ge=1, validation_alias=_env("LOCKSTEP_MAX_NEW_TOKENS_LIMIT"),
                                      description="Upper bound a request may ask for.")
    max_prompt_chars: int = Field(32_000, ge=1, validation_alias=_env("LOCKSTEP_MAX_PROMPT_CHARS"),
                                  description="Longest prompt accepted, in characters.")
    served_model_name: str = Field("lockstep", min_length=1, validation_alias=_env("LOCKSTEP_SERVED_MODEL_NAME"),
                                   description="Model id in the OpenAI API; answers say '<name>@v<N>'.")
    api_token: str | None = Field(None, validation_alias=_env("LOCKSTEP_API_TOKEN"),
                                  description="Bearer token required by mutating endpoints when set.")

    # --- hardening: who may call, and how much one request may ask for --------------------------------
    allow_unauthenticated: bool = Field(
        False, validation_alias=_env("LOCKSTEP_ALLOW_UNAUTHENTICATED"),
        description="Let serve/trainer/ui start without LOCKSTEP_API_TOKEN on a non-loopback address (anyone who "
        "reaches them can then publish, roll back and start runs).")
    allowed_hosts: str = Field(
        "", validation_alias=_env("LOCKSTEP_ALLOWED_HOSTS"),
        description="Comma-separated Host header names a server answers (other Hosts get 400: defeats DNS "
        "rebinding); '*' any. Empty: loopback names when bound to loopback, else any.")
    max_body_bytes: int = Field(1_048_576, ge=1024, le=1 << 30, validation_alias=_env("LOCKSTEP_MAX_BODY_BYTES"),
                                description="Largest request body in bytes (413 above it, checked before parsing); "
                                "upload file bodies have their own limit.")
    max_chat_messages: int = Field(256, ge=1, le=4096, validation_alias=_env("LOCKSTEP_MAX_CHAT_MESSAGES"),
                                   description="Most messages in one chat request; their total characters are "
                                   "bounded by LOCKSTEP_MAX_PROMPT_CHARS.")
    max_upload_bytes: int = Field(64 << 30, ge=1, validation_alias=_env("LOCKSTEP_MAX_UPLOAD_BYTES"),
                                  description="Largest upload in bytes, all its files together (413 above it).")
    max_upload_files: int = Field(10_000, ge=1, validation_alias=_env("LOCKSTEP_MAX_UPLOAD_FILES"),
                                  description="Most files in one upload.")
    max_open_uploads: int = Field(8, ge=1, validation_alias=_env("LOCKSTEP_MAX_OPEN_UPLOADS"),
                                  description="Uploads open at once (not yet published or expired); beyond it 429.")
    gc_grace_s: float = Field(3600.0, ge=0, validation_alias=_env("LOCKSTEP_GC_GRACE_S"),
                              description="Seconds an aborted or partial version folder is kept before garbage "
                              "collection removes it.")
    clock_skew_s: float = Field(2.0, ge=0, le=300, validation_alias=_env("LOCKSTEP_CLOCK_SKEW_S"),
                                description="Seconds a heartbeat or report may be stamped in the future; beyond it "
                                "the reader ignores it.")
    ui_public_reads: bool = Field(False, validation_alias=_env("LOCKSTEP_UI_PUBLIC_READS"),
                                  description="Let the UI's read-only views (cluster, versions, runs) be seen without "
                                  "logging in; changes always need a login.")
    ui_trusted_user_header: str | None = Field(
        None, validation_alias=_env("LOCKSTEP_UI_TRUSTED_USER_HEADER"),
        description="Header set by an authenticating reverse proxy (e.g. X-Forwarded-User for oauth2-proxy) that "
        "the UI takes as a login. Only set it when every request reaches the UI through that proxy.")

    # --- trainer and UI ------------------------------------------------------------------------------
    inference_urls: str = Field("", validation_alias=_env("INFERENCE_URLS"),
                                description="Comma-separated replica URLs (static discovery).")
    inference_service_url: str | None = Field(None, validation_alias=_env("LOCKSTEP_INFERENCE_SERVICE_URL"),
                                              description="Load-balanced inference URL (the Service).")
    headless_service: str | None = Field(None, validation_alias=_env("LOCKSTEP_HEADLESS_SERVICE"),
                                         description="DNS name of the headless service, e.g. inference-headless.")
    discovery: str = Field("auto", validation_alias=_env("LOCKSTEP_DISCOVERY"),
                           description="auto | static | dns | kubernetes | heartbeats.")
    k8s_namespace: str | None = Field(None, validation_alias=_env("POD_NAMESPACE"),
                                      description="Namespace for Kubernetes API discovery.")
    k8s_label_selector: str = Field("app=inference-server", validation_alias=_env("LOCKSTEP_K8S_LABEL_SELECTOR"),
                                    description="Label selector of inference pods.")
    replica_port: int = Field(8000, ge=1, le=65535, validation_alias=_env("LOCKSTEP_REPLICA_PORT"),
                              description="Port of a replica found by DNS or the Kubernetes API.")
    trainer_url: str = Field("http://127.0.0.1:8090", validation_alias=_env("TRAINER_URL"),
                             description="Where the UI reaches the trainer.")
    job_template_dir: Path | None = Field(
        None, validation_alias=_env("LOCKSTEP_JOB_TEMPLATE_DIR"),
        description="Folder of Kubernetes Job templates for job runs (<name>.yaml; params.template picks one, "
        "default job); unset: job runs are refused.")
    kubeconfig: Path | None = Field(
        None, validation_alias=_env("LOCKSTEP_KUBECONFIG"),
        description="Kubeconfig file through which the trainer creates the Jobs of job runs; unset: the pod's "
        "service account (in-cluster).")
    reward_plugins: str = Field("", validation_alias=_env("LOCKSTEP_REWARD_PLUGINS"),
                                description="Comma-separated module prefixes a finetune run may import a reward "
                                "plug-in (package.module:function) from; '*' allows any; empty: none.")

    @field_validator("hf_home", "versions_dir", "builtin_dir", "shared_dir", "sync_state_file", "trainer_data_dir",
                     "coordinator_url", "api_token", "ui_trusted_user_header", "job_template_dir", "kubeconfig",
                     mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("api_token", mode="before")
    @classmethod
    def _token(cls, value: object) -> object:
        # A Secret made from a file ends in a newline: sent as is, the header is invalid, and httpx's error
        # about it quotes the token. Surrounding whitespace is dropped; a token must be visible ASCII.
        if not isinstance(value, str):
            return value
        token = value.strip()
        if any(not 0x21 <= ord(c) <= 0x7E for c in token):
            raise ValueError("it holds spaces, control or non-ASCII characters; use visible ASCII, e.g. "
                             "`openssl rand -hex 32`")
        return token or None

    @field_validator("*", mode="after")
    @classmethod
    def _unicode(cls, value: object) -> object:
        # An environment value that is not UTF-8 reaches Python as lone surrogates; as a replica id or a model
        # name it went into every response's headers and JSON, and each one was a 500.
        if isinstance(value, (str, Path)):
            try:
                str(value).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("it is not valid UTF-8; use UTF-8 text (or plain ASCII)") from None
        return value

    # --- derived paths -------------------------------------------------------------------------------
    @property
    def sync_state_path(self) -> Path | None:
        if self.sync_state_file is not None:
            return self.sync_state_file
        return self.shared_dir / "sync_state.json" if self.shared_dir else None

    @property
    def hf_home_path(self) -> Path:
        if self.hf_home is not None:
            return self.hf_home
        if self.shared_dir is not None:
            return self.shared_dir / "hf_home"
        return Path.home() / ".cache" / "huggingface"

    @property
    def builtin_path(self) -> Path:
        if self.builtin_dir is not None:
            return self.builtin_dir
        if self.shared_dir is not None:
            return self.shared_dir / "builtin"
        return Path.home() / ".cache" / "lockstep" / "builtin"

    @property
    def trainer_data_path(self) -> Path:
        if self.trainer_data_dir is not None:
            return self.trainer_data_dir
        return Path.home() / ".local" / "share" / "lockstep" / "trainer"

    @property
    def allowed_host_list(self) -> list[str]:
        """Host names (no port) from LOCKSTEP_ALLOWED_HOSTS; empty means any."""
        names = [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]
        return [] if "*" in names else names

    @field_validator("vllm_args")
    @classmethod
    def _vllm_args_is_object(cls, value: str) -> str:
        if value.strip():
            import json

            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"LOCKSTEP_VLLM_ARGS is not JSON: {exc}") from exc
            if not isinstance(parsed, dict):
                raise ValueError("LOCKSTEP_VLLM_ARGS must be a JSON object of AsyncEngineArgs options")
        return value

    @property
    def vllm_extra_args(self) -> dict[str, object]:
        """LOCKSTEP_VLLM_ARGS parsed (validated as a JSON object at start)."""
        import json

        return json.loads(self.vllm_args) if self.vllm_args.strip() else {}

    @property
    def inference_url_list(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.inference_urls.split(",") if u.strip()]


def load_settings(**overrides: object) -> Settings:
    """Read the environment once; CLI flags arrive as overrides and win."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)


def reference_markdown() -> str:
    """The configuration reference as a Markdown table (docs/configuration.md is generated from it)."""
    rows = ["# Configuration", "",
            "Every setting Lockstep reads, generated from `lockstep.core.settings.Settings` "
            "(`python -m lockstep.core.settings > docs/configuration.md`).",
            "Settings are read once from the environment when a process starts; command-line flags "
            "(`--shared`, `--model`, `--port`) override them.", "",
            "| environment variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names = " / ".join(f"`{c}`" for c in alias.choices) if isinstance(alias, AliasChoices) else f"`{name}`"
        default = field.default.value if isinstance(field.default, Enum) else field.default
        shown = "unset" if default is None else f"`{default}`"
        meaning = (field.description or "").replace("|", "\\|")  # a bare | splits the cell
        rows.append(f"| {names} | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
