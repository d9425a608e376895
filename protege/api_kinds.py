"""What each kind of teacher endpoint can honestly give, and the start-up check of a config against it.

    teacher.protocol      what the endpoint gives                          losses that work
    protege               anything (protege serve-teacher: top-k,          every remote one (support
                          logprobs at the student's ids, token logprobs)   teacher|student|union|sampled)
    openai                vLLM's prompt_logprobs: the teacher's top-k      on-policy scoring with
                          and the actual token's logprob on ANY tokens     support=teacher|sampled, T=1
    openai-chat           generation only: text, and with logprobs the     teacher samples only
    openai-completions    top_logprobs (<= 20) of the teacher's OWN        (mix.lmbda=0, mix.seq_kd=true):
                          tokens                                           sft on the text, or top-k
                                                                           divergences (support=teacher
                                                                           |sampled, top_k <= 20, T=1)

An API can neither score the student's rollouts nor a dataset's references (it never sees tokens it
did not generate), so every row must be a teacher sample. Pure Python (no torch): protege.config imports it.
"""

from __future__ import annotations

from protege.loss_names import LossName, Support

API_KINDS = ("openai-chat", "openai-completions")
MAX_TOP_LOGPROBS = 20  # what OpenAI's API returns at most per position


def check_api_teacher(protocol: str, *, lmbda: float, seq_kd: bool, loss_name: str, support: str, top_k: int,
                      temperature: float, several: bool = False) -> None:
    """ValueError naming what an API-kind teacher (openai-chat / openai-completions) cannot give, and the
    settings that work; nothing for the other protocols. `several`: the teacher is one of `teachers:`."""
    if protocol not in API_KINDS:
        return
    if several:
        raise ValueError(f"teacher.protocol={protocol} (a generation API) cannot be one of several teachers "
                         "(teachers:): it only describes its own samples. Use it as the one teacher (teacher:).")
    problems = []
    if lmbda != 0 or not seq_kd:
        problems.append(f"every row must be a teacher sample (mix.lmbda={lmbda:g}, mix.seq_kd={seq_kd}): the API "
                        "cannot score student rollouts or dataset references")
    loss_name, support = LossName(loss_name), Support(support)
    if loss_name.needs_rollouts:
        problems.append("loss.name=sampled_pg needs student rollouts scored by the teacher")
    elif loss_name.reads_logprobs:
        if support.exact or support.reads_student_ids:  # only its own tokens' top logprobs come back
            problems.append(f"loss.support={support} needs logprobs the API does not send (it sends the top "
                            "logprobs of its own tokens only)")
        if support is Support.TEACHER and top_k > MAX_TOP_LOGPROBS:
            problems.append(f"loss.top_k={top_k} is more than the {MAX_TOP_LOGPROBS} top_logprobs an API sends")
        if temperature != 1.0:
            problems.append(f"loss.temperature={temperature:g}: API logprobs are the model's own distribution "
                            "(temperature 1)")
    if not problems:
        return
    raise ValueError(
        f"teacher.protocol={protocol} is a generation API: it gives text, and top_logprobs (<= "
        f"{MAX_TOP_LOGPROBS}) of the teacher's own tokens, nothing else. " + "; ".join(problems) + ". "
        "Settings that work: (1) supervised KD on the teacher's text: mix.lmbda=0, mix.seq_kd=true, loss.name=sft; "
        f"(2) top-k forward KL on teacher samples: mix.lmbda=0, mix.seq_kd=true, loss.name=forward_kl, "
        f"loss.support=teacher, loss.top_k<={MAX_TOP_LOGPROBS}, loss.temperature=1 (needs an endpoint that "
        "returns token ids: vLLM or protege serve-teacher, with the student's vocabulary); (3) on-policy scoring "
        "of the student's rollouts: a vLLM server with teacher.protocol=openai (prompt_logprobs), or protege "
        "serve-teacher with teacher.protocol=protege.")
