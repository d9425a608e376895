"""The teacher's config sections (one `teacher:` or several named `teachers:`) and the rules about teachers.

TeacherConfig.kind names what the teacher is (resolved_kind infers `auto` once, here); check_cache and
check_teachers_config refuse settings that cannot work together.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from protege.config.sections import Section
from protege.loss_names import Support


class TeacherConfig(Section):
    kind: str = Field("auto", pattern=r"^(auto|in-process|server|self|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$",
                      description="What the teacher is: in-process (teacher.path), server (teacher.urls; an API with "
                      "teacher.protocol=openai-chat|openai-completions), self (teacher.self), or a teacher kind of your "
                      "own as module:Class (a protege.teacher.base.Teacher with a from_config classmethod, see "
                      "docs/teachers.md). auto: from which of path, urls or self is set.")
    options: dict[str, Any] = Field(default_factory=dict, description="Settings a teacher kind of your own reads "
                                    "(teacher.kind=module:Class); protege's kinds read none.")
    path: str | None = Field(None, description="In-process teacher: HF hub id, local HF dir, a .gguf file, or "
                             "smollm2 (embedded).")
    urls: list[str] = Field(default_factory=list, description="Remote teacher server URL(s) (protege serve-teacher "
                            "or an OpenAI-compatible vLLM server). Several URLs are load-balanced.")
    api_key: str | None = Field(None, description="Bearer token for the teacher server (or env PROTEGE_API_KEY; "
                                "API kinds also OPENAI_API_KEY).")
    protocol: Literal["protege", "openai", "openai-chat", "openai-completions"] = Field(
        "protege", description="Teacher server kind: protege (protege serve-teacher), openai (vLLM's "
        "/v1/completions prompt_logprobs: on-policy scoring), openai-chat / openai-completions (a generation API: "
        "teacher samples with text and top_logprobs only; see docs/remote_teachers.md).")
    model: str | None = Field(None, description="API kinds / openai: the model name sent in requests (None: the "
                              "first model of the server's /v1/models).")
    max_concurrency: int = Field(8, ge=1, description="API kinds: requests in flight at once.")
    api_store: str | None = Field(None, description="API kinds: folder of stored teacher completions (keyed by "
                                  "model, prompt and sampling settings; generated once). None: "
                                  "<output.dir>/teacher_api.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="In-process teacher dtype.")
    batch_tokens: int = Field(16384, ge=64, description="Token budget of one teacher forward batch.")
    logprob_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Server: dtype of logprobs on the wire; float16 makes replies ~1.5x smaller at "
        "<=2^-7 absolute error for logprobs in [-30, 0] (ids are lossless uint16 when the vocabulary fits).")
    timeout_s: float = Field(300.0, gt=0, description="Server: timeout of one HTTP request.")
    min_wire_version: int = Field(3, ge=1, le=3, description="Server: the oldest wire version the client may step "
                                  "down to when a server says it does not read a newer one. 3 (default): only the "
                                  "checksummed wire, a server that refuses it stops the run; 2 or 1: an older protege "
                                  "server is accepted without a crc32 check of its replies (logged, counted in the "
                                  "step metrics teacher_wire_downgrades).")
    max_wait_s: float = Field(600.0, gt=0, description="Server: how long to keep retrying (with backoff) while the "
                              "teacher server is down or overloaded before the run stops with an error.")
    hidden_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Server, loss.support=full: dtype of the teacher's hidden states on the wire (H numbers "
        "per token instead of V logits; the client applies the teacher's output projection). float16: 2^-11 relative "
        "rounding, refused by the server beyond |h| = 65504; bfloat16: 2^-8, any range; float32: exact.")
    projection_cache: str | None = Field(None, description="Server, loss.support=full: a directory that keeps the "
                                         "teacher's output projection between runs (<sha256>.prtg); None: memory only.")
    vocab_size: int | None = Field(None, ge=1, description="Server: the teacher's vocabulary size (its logits' width, "
                                   "config.json 'vocab_size'), for an OpenAI-compatible server that does not report "
                                   "it (stock vllm serve). None: the server's own figure, else the config.json of "
                                   "the model it serves when readable here.")
    cache_dir: str | None = Field(None, description="Teacher-score cache folder (off when None): the teacher's "
                                  "answers are stored per (teacher, token ids, request) and reused by later epochs, "
                                  "reruns and resumes (see docs/remote_teachers.md; `protege cache-teacher` fills "
                                  "it ahead of a run).")
    cache_hidden: bool = Field(False, description="Cache an in-process teacher's hidden states too (H floats per "
                               "token), which loss.support=full|teacher|student|union with teacher.path reads.")
    cache_revision: str | None = Field(None, description="Extra identity string in the cache's teacher manifest "
                                       "(e.g. the served weights' revision): a server reports only a model name, so "
                                       "change this when the weights behind that name change.")
    self: Literal["base", "ema", "live"] | None = Field(
        None, description="The student as its own teacher (self-distillation; usually with privileged context, "
        "docs/teachers.md): base = the starting weights (with LoRA: the adapter disabled, no second copy), ema = an "
        "exponential moving average of the student (teacher.ema_rate), live = the current weights without gradient.")
    ema_rate: float = Field(0.05, gt=0, le=1, description="teacher.self=ema: after each optimizer step "
                            "theta_T <- (1 - rate) * theta_T + rate * theta_S (TRL SDFT's 0.05; 1 = live weights).")
    system_prompt: str | None = Field(None, description="A system message only the teacher sees (joined before the "
                                      "row's own system message, if any): context distillation.")
    tokenizer: str | None = Field(None, description="The teacher's tokenizer and chat template (HF folder, hub id, "
                                  ".gguf or smollm2) when it is not the student's. None: teacher.path's (in-process) "
                                  "or the student's (server).")
    cross_tokenizer: Literal["auto", "on", "off"] = Field(
        "auto", description="Distil across tokenizers (re-tokenize the student's text for the teacher, align by "
        "bytes; docs/cross_tokenizer.md): auto = when the teacher's tokenizer differs from the student's, on = "
        "always, off = never (a different vocabulary is then an error).")

    @field_validator("cross_tokenizer", mode="before")
    @classmethod
    def _on_off(cls, value):  # YAML reads a bare on/off as true/false
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @property
    def resolved_kind(self) -> str:
        """teacher.kind, with auto resolved from the source that is set (the one place that infers it)."""
        if self.kind != "auto":
            return self.kind
        return "server" if self.urls else "self" if self.self is not None else "in-process"

    @property
    def plugin(self) -> bool:
        """A teacher kind of the user's own (teacher.kind=module:Class)."""
        return ":" in self.kind

    @model_validator(mode="after")
    def _one_source(self):
        if self.plugin:
            return self
        if sum([self.path is not None, bool(self.urls), self.self is not None]) != 1:
            raise ValueError("set exactly one of teacher.path (in-process), teacher.urls (server) or teacher.self "
                             "(the student itself: base, ema or live)")
        source = {"in-process": self.path is not None, "server": bool(self.urls), "self": self.self is not None}
        if self.kind != "auto" and not source[self.kind]:
            raise ValueError(f"teacher.kind={self.kind} needs teacher."
                             f"{ {'in-process': 'path', 'server': 'urls', 'self': 'self'}[self.kind]}: set it, or set "
                             "teacher.kind=auto")
        return self


class NamedTeacherConfig(TeacherConfig):
    """One of several teachers (`teachers:`): every teacher setting, plus a name, a weight and offloading."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="The teacher's name: the value of "
                      "data.teacher_column that routes a row to it, and its metrics' prefix teacher/<name>/.")
    weight: float = Field(1.0, gt=0, description="teachers_mode=mixture: this teacher's share of the combined "
                          "target (weights are normalised to sum to 1). Routed mode: must stay 1.")
    offload: bool = Field(False, description="In-process teacher: keep its weights on the CPU and move them to "
                          "the device only for its scoring pass (teachers that do not fit together).")

    @model_validator(mode="after")
    def _offload_local(self):
        if self.offload and self.urls:
            raise ValueError(f"teachers[{self.name}].offload=true needs an in-process teacher (path); a teacher "
                             "behind urls already lives on its server: remove offload")
        return self


def check_cache(t: TeacherConfig, loss: LossConfig) -> None:
    """teacher.cache_* settings that cannot work, refused at start-up (see protege.teacher.cache)."""
    if t.cache_dir is None:
        if t.cache_hidden:
            raise ValueError("teacher.cache_hidden=true needs teacher.cache_dir (the cache folder)")
        return
    if t.self is not None:
        raise ValueError(f"teacher.cache_dir with teacher.self={t.self}: a self teacher is not cached (ema and live "
                         "change as the student trains, base lives in the student's weights); unset teacher.cache_dir")
    if t.protocol in ("openai-chat", "openai-completions"):
        raise ValueError(f"teacher.cache_dir with teacher.protocol={t.protocol}: an API teacher keeps its own store "
                         "(teacher.api_store); unset teacher.cache_dir")
    token_level = loss.name.token_level or loss.support is Support.SAMPLED
    cross = t.cross_tokenizer == "on" or t.tokenizer is not None  # a cross-tokenizer teacher is asked for top-k
    reads_hidden = not token_level and not cross and (t.path is not None or loss.support.exact)
    if reads_hidden and not t.cache_hidden:
        raise ValueError(f"teacher.cache_dir with loss.support={loss.support} and this teacher: the loss reads the "
                         "teacher's hidden states; set teacher.cache_hidden=true to cache them, or use "
                         "loss.support=sampled (or loss.name=sampled_pg|sft), or a top-k support with teacher.urls")


def teacher_configs(cfg: Config) -> list[TeacherConfig]:
    """The run's teacher settings: the named teachers, or the one teacher."""
    return list(cfg.teachers) if cfg.teachers else [cfg.teacher]


def check_teachers_config(cfg: Config) -> None:
    """One teacher or several named ones, never both; names unique; settings that fit the mode (docs/teachers.md)."""
    if cfg.teacher is None and not cfg.teachers:
        raise ValueError("teacher: required, not set (set teacher.path or teacher.urls, or teachers: a list of "
                         "named teachers)")
    if cfg.teacher is not None and cfg.teachers:
        raise ValueError("set either teacher (one teacher) or teachers (several named teachers), not both: move "
                         "teacher.path/urls into an entry of teachers")
    if not cfg.teachers:
        return
    names = [t.name for t in cfg.teachers]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"teachers: the names {twice} are used more than once; give each teacher its own name")
    if cfg.data.default_teacher is not None and cfg.data.default_teacher not in names:
        raise ValueError(f"data.default_teacher={cfg.data.default_teacher!r} names no teacher; known: {names}")
    if cfg.teachers_mode == "routed":
        weighted = [t.name for t in cfg.teachers if t.weight != 1.0]
        if weighted:
            raise ValueError(f"teachers {weighted}: weight is used by teachers_mode=mixture only (in routed mode "
                             "each row has one teacher); remove it or set teachers_mode=mixture")
    elif cfg.loss.support.reads_teacher_topk and any(t.urls for t in cfg.teachers) and not cfg.loss.name.token_level:
        raise ValueError(f"teachers_mode=mixture with a teacher behind urls cannot combine top-k lists "
                         f"(loss.support={cfg.loss.support}: each teacher's top-k ids differ): use "
                         "loss.support=student|sampled or loss.name=sampled_pg, or in-process teachers")
    if cfg.mix.seq_kd:
        raise ValueError("mix.seq_kd (teacher samples) with several teachers is not supported: use dataset "
                         "references (mix.seq_kd=false) or one teacher")
