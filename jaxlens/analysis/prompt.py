"""test_prompt: does the model give the answer? Rank, logit and probability of each answer token where it is
predicted, and the top-k alternatives (TransformerLens's `utils.test_prompt`, returning what it prints).

    res = test_prompt(model, "The capital of France is", "Paris")
    res.ranks       # [n_answers answer_len]: 0 means the answer is the top prediction
    print(res)      # TL's report: tokenized prompt, answer, top-k table per answer position

One answer string may span several tokens: each is scored where it is predicted (teacher forcing). Several
answer strings are compared as alternatives for the next token, so each must be exactly one token.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.errors import InputError


@dataclass(frozen=True)
class PromptTest:
    """What test_prompt measured. Arrays are numpy; [n_answers answer_len] unless said otherwise."""

    prompt_str_tokens: list[str]
    answer_str_tokens: list[list[str]]
    answer_tokens: np.ndarray  # ids
    ranks: np.ndarray  # 0 = top prediction
    logits: np.ndarray
    probs: np.ndarray
    top_tokens: np.ndarray  # [n_answers answer_len top_k] ids
    top_logits: np.ndarray
    top_probs: np.ndarray
    top_str_tokens: list[list[list[str]]]

    def __str__(self) -> str:
        lines = [f"Tokenized prompt: {self.prompt_str_tokens}"]
        multi = len(self.answer_str_tokens) > 1
        lines.append(f"Tokenized answer{'s' if multi else ''}: "
                     f"{self.answer_str_tokens if multi else self.answer_str_tokens[0]}")
        for j in range(self.ranks.shape[1]):
            lines.append(f"Performance on answer token{'s' if multi else ''}:")
            for a in range(self.ranks.shape[0]):
                lines.append(f"Rank: {self.ranks[a, j]: <8} Logit: {self.logits[a, j]:5.2f} Prob: "
                             f"{self.probs[a, j]:6.2%} Token: |{self.answer_str_tokens[a][j]}|")
            for i in range(self.top_tokens.shape[2]):
                lines.append(f"Top {i}th token. Logit: {self.top_logits[0, j, i]:5.2f} Prob: "
                             f"{self.top_probs[0, j, i]:6.2%} Token: |{self.top_str_tokens[0][j][i]}|")
        ranks = [[(self.answer_str_tokens[a][j], int(self.ranks[a, j])) for a in range(self.ranks.shape[0])]
                 for j in range(self.ranks.shape[1])]
        lines.append(f"Ranks of the answer tokens: {[r[0] for r in ranks] if not multi else ranks}")
        return "\n".join(lines)


def test_prompt(
    model,
    prompt: str,
    answer: str | list[str],
    prepend_space_to_answer: bool = True,
    print_details: bool = True,
    prepend_bos: bool | None = None,
    top_k: int = 10,
) -> PromptTest:
    """Score the answer after the prompt; print TL's report if print_details; return the numbers.

    Args:
        model: a HookedTransformer with a tokenizer.
        prompt: the text before the answer.
        answer: the expected continuation, or several one-token alternatives.
        prepend_space_to_answer: prefix a space to answers that do not start with one.
        print_details: print the report (as TL does).
        prepend_bos: override cfg.default_prepend_bos for the prompt.
        top_k: alternatives to list per answer position.

    Raises:
        InputError: an empty prompt or answer, several answers that are not exactly one token each, a
            prompt + answer longer than n_ctx, or top_k outside [1, d_vocab].
    """
    if not isinstance(prompt, str) or not prompt:
        raise InputError("Empty prompt: test_prompt needs some text before the answer.")
    answers = [answer] if isinstance(answer, str) else list(answer)
    if not answers or any(not a for a in answers):
        raise InputError(f"Empty answer in {answers!r}: give the expected continuation.")
    if not 1 <= top_k <= model.cfg.d_vocab:
        raise InputError(f"top_k must be in [1, d_vocab={model.cfg.d_vocab}]; found {top_k}.")
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    prompt_ids = np.asarray(model.to_tokens(prompt, prepend_bos=prepend_bos))[0]
    answer_ids = [np.asarray(model.to_tokens(a, prepend_bos=False))[0] for a in answers]
    if len(answers) > 1:
        long = {a: len(i) for a, i in zip(answers, answer_ids, strict=True) if len(i) != 1}
        if long:
            raise InputError(
                f"Several answers are compared as the next token, so each must be one token; these are not: "
                f"{ {a: model.to_str_tokens(a, prepend_bos=False) for a in long} }. Pass a single "
                "(multi-token) answer, or one-token alternatives.")
    answer_ids = np.stack(answer_ids)  # [n_answers answer_len]
    n_p, n_a = len(prompt_ids), answer_ids.shape[1]
    if n_p + n_a > model.cfg.n_ctx:
        raise InputError(f"Prompt ({n_p} tokens) + answer ({n_a}) exceeds n_ctx={model.cfg.n_ctx}.")
    tokens = jnp.asarray(np.concatenate([np.tile(prompt_ids, (len(answers), 1)), answer_ids], axis=1))
    logits = model(tokens)[:, n_p - 1:n_p - 1 + n_a].astype(jnp.float32)  # predictions of the answer tokens
    res = _score(logits, jnp.asarray(answer_ids), top_k)
    res = jax.tree_util.tree_map(np.asarray, res)
    out = PromptTest(
        prompt_str_tokens=model.to_str_tokens(prompt_ids),
        answer_str_tokens=[model.to_str_tokens(i) for i in answer_ids],
        answer_tokens=answer_ids, **res,
        top_str_tokens=[[model.to_str_tokens(row) for row in a] for a in res["top_tokens"]],
    )
    if print_details:
        print(out)
    return out


test_prompt.__test__ = False  # not a pytest test, despite the TransformerLens name


def _score(logits, answer_ids, top_k: int) -> dict:
    """Ranks, logits and probs of the answers, and the top-k table, from [n_answers answer_len d_vocab]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, answer_ids[..., None], axis=-1)[..., 0]
    ranks = (logits > chosen[..., None]).sum(-1)
    top_logits, top_ids = jax.lax.top_k(logits, top_k)
    probs = jnp.exp(jnp.take_along_axis(logp, answer_ids[..., None], axis=-1)[..., 0])
    return dict(ranks=ranks, logits=chosen, probs=probs, top_tokens=top_ids, top_logits=top_logits,
                top_probs=jnp.exp(jnp.take_along_axis(logp, top_ids, axis=-1)))
