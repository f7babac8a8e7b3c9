"""TransformerLens's token helpers for `HookedTransformer` (a mixin): text <-> ids <-> strings, single tokens,
token positions, the unembedding directions of tokens, the embedding entering block 0, the tokenizer.

    model.to_tokens(["Hi", "When Mary"], padding_side="left")  # [batch pos], BOS prepended (cfg default)
    model.to_str_tokens(["Hi", "When Mary"])                   # a list of lists of strings, as TL
    model.tokens_to_residual_directions(tokens)                # [batch k d_model] for tokens [batch k]
    resid, tokens, _, mask = model.input_to_embed("Hi there")  # resid_pre of block 0, TL 4.3's return

Signatures and return shapes follow TransformerLens 4.3; where TL asserts, jaxlens raises an
`InputAssertionError` (also an AssertionError) with the reason and the fix.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxlens import tokenizer as tok
from jaxlens.errors import InputAssertionError, InputError


class TokenMethods:
    """Mixin: needs `self.cfg`, `self.tokenizer`, `self.W_U` and `self.forward`."""

    def to_tokens(self, input: str | list[str], prepend_bos: bool | None = None,
                  padding_side: str | None = None, move_to_device: bool = True,
                  truncate: bool = True) -> Int[Array, "batch pos"]:
        """Token ids [batch pos] (TL 4.3's `to_tokens`).

        Args:
            input: a string or a list of strings (rows padded with the pad, or EOS, token).
            prepend_bos: prepend BOS; None follows cfg.default_prepend_bos.
            padding_side: "right" or "left"; None follows the tokenizer's `padding_side` (right by default).
            move_to_device: accepted for TL's signature and ignored: JAX puts the array on its default device.
            truncate: cut each row to its first n_ctx tokens, as TL does (default); with False the tokens are
                returned whole, and running a row longer than n_ctx raises InputError.

        Raises:
            InputError: no tokenizer, empty input, or a padding_side other than "right" / "left".
        """
        bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        side = padding_side or getattr(self.tokenizer, "padding_side", None) or "right"
        return jnp.asarray(tok.encode(self.tokenizer, input, bos, padding_side=side,
                                      max_length=self.cfg.n_ctx if truncate else None))

    def to_string(self, tokens) -> str | list[str]:
        """Decode ids: one string for [pos] (or a scalar), a list of strings for [batch pos].

        Raises:
            InputError: tokens with more than 2 axes (TL raises ValueError).
        """
        arr = np.asarray(tokens)
        if arr.ndim > 2:
            raise InputError(f"to_string takes ids [pos] or [batch pos]; found shape {arr.shape}.")
        if arr.ndim == 2:
            return [self._decode(r) for r in arr]
        return self._decode(arr.reshape(-1))

    def to_str_tokens(self, input, prepend_bos: bool | None = None,
                      padding_side: str | None = None) -> list[str] | list[list[str]]:
        """Each token as a string. Text is tokenized first; a list of texts (or of id arrays) gives a list of
        lists, as TL; ids may be [pos] or [1 pos] (a list of ints counts as [pos]).

        Raises:
            InputAssertionError: ids that are not one sequence (a [batch pos] batch with batch > 1).
        """
        if isinstance(input, (list, tuple)) and not all(isinstance(i, (int, np.integer)) for i in input):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
        if isinstance(input, str):
            ids = np.asarray(self.to_tokens(input, prepend_bos, padding_side))[0]
        else:
            ids = _one_sequence(input, "to_str_tokens")
        return [self._decode([int(i)]) for i in ids]

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token.

        Raises:
            InputAssertionError: the string is several tokens, or none (TL asserts it).
        """
        ids = tok.encode(self.tokenizer, string, prepend_bos=False)[0] if string else []
        if len(ids) != 1:
            raise InputAssertionError(
                f"{string!r} is {len(ids)} tokens ({[self.tokenizer.decode([int(i)]) for i in ids]}), not "
                "one. Pick a string that is a single token (often with a leading space).")
        return int(ids[0])

    def to_single_str_token(self, int_token) -> str:
        """The string of one token id, an int (TL's `to_single_str_token`).

        Raises:
            InputAssertionError: `int_token` is not an integer (TL asserts it).
            InputError: the id is outside the vocabulary.
        """
        if isinstance(int_token, bool) or not isinstance(int_token, (int, np.integer)):
            raise InputAssertionError(f"to_single_str_token takes one int token id; found {int_token!r}. For "
                                      "several ids use to_str_tokens.")
        if not 0 <= int_token < self.cfg.d_vocab:
            raise InputError(f"Token id {int_token} is outside the vocabulary [0, {self.cfg.d_vocab}).")
        return self._decode([int(int_token)])

    def get_token_position(self, single_token: str | int, input, mode: str = "first",
                           prepend_bos: bool | None = None, padding_side: str | None = None) -> int:
        """Position of `single_token` (a one-token string, or an id) in `input` (text, ids [pos] or [1 pos]).

        Raises:
            InputAssertionError: the token does not occur, or ids with a batch of more than 1 (TL asserts).
            InputError: mode is not "first" or "last".
        """
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        if isinstance(input, str):
            ids = np.asarray(self.to_tokens(input, prepend_bos, padding_side))[0]
        else:
            ids = _one_sequence(input, "get_token_position")
        where = np.nonzero(ids == token)[0]
        if where.size == 0:
            raise InputAssertionError(
                f"Token {token} ({self._decode([token])!r}) does not occur in the input.")
        if mode not in ("first", "last"):
            raise InputError(f"mode must be 'first' or 'last'; found {mode!r}.")
        return int(where[0] if mode == "first" else where[-1])

    def tokens_to_residual_directions(self, tokens) -> Float[Array, "... d_model"]:
        """The unembedding direction (W_U column) of each token: tokens.shape + [d_model] for an array of
        several ids; [d_model] for one token (a string of one token, an int, or an array of one element).

        Raises:
            InputError: ids that are not integers, empty, or outside the vocabulary (TL raises ValueError).
        """
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        arr = np.asarray(tokens)
        if not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
            raise InputError(f"tokens_to_residual_directions takes token ids (int, str or int array); found "
                             f"{type(tokens).__name__} of dtype {arr.dtype}.")
        if arr.size == 0:
            raise InputError("tokens_to_residual_directions: no tokens given (an empty array).")
        d_vocab = self.W_U.shape[-1]
        if arr.min() < 0 or arr.max() >= d_vocab:
            raise InputError(
                f"Token ids must lie in [0, {d_vocab}); found {int(arr.min())}..{int(arr.max())}.")
        if arr.size == 1:
            return self.W_U[:, int(arr.reshape(()))]
        return self.W_U.T[jnp.asarray(arr)]  # TL: rearrange(W_U[:, tokens], "d_model ... -> ... d_model")

    def input_to_embed(self, input, prepend_bos: bool | None = None, padding_side: str | None = None,
                       attention_mask=None):
        """The residual stream entering block 0, as TL 4.3's `input_to_embed`.

        Args:
            input: text, a list of texts, or ids [pos] / [batch pos].
            prepend_bos, padding_side: as `to_tokens`, for text.
            attention_mask: [batch pos], True for real tokens; None builds one for left-padded text (the
                leading pad tokens masked, a BOS equal to the pad token kept), as TL does.

        Returns:
            (residual [batch pos d_model], tokens [batch pos], None, attention_mask or None): feed the
            residual to `model(residual, start_at_layer=0, attention_mask=...)` to resume. The third entry
            is TL's shortformer positional embedding, always None (the residual already holds the positions).
        """
        if isinstance(input, (str, list)):
            tokens = self.to_tokens(input, prepend_bos, padding_side)
        else:
            tokens = jnp.atleast_2d(jnp.asarray(input))
        side = padding_side or getattr(self.tokenizer, "padding_side", None) or "right"
        if attention_mask is None and self.tokenizer is not None and side == "left":
            bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
            attention_mask = _left_padding_mask(np.asarray(tokens), self.tokenizer, bos)
        residual = self.forward(tokens, stop_at_layer=0, attention_mask=attention_mask)
        return residual, tokens, None, attention_mask

    def set_tokenizer(self, tokenizer, default_padding_side: str | None = None) -> None:
        """Use `tokenizer` from now on (TL's `set_tokenizer`); `default_padding_side` ("right" / "left") sets
        its `padding_side`, which `to_tokens` follows.

        Raises:
            InputAssertionError: default_padding_side is not "right", "left" or None (TL asserts it).
        """
        if default_padding_side not in ("right", "left", None):
            raise InputAssertionError(
                f"default_padding_side must be 'right', 'left' or None; found {default_padding_side!r}.")
        if default_padding_side is not None:
            tokenizer.padding_side = default_padding_side
        self.tokenizer = tokenizer

    def _decode(self, ids) -> str:
        if self.tokenizer is None:
            raise InputError("This model has no tokenizer; give one to HookedTransformer or set_tokenizer.")
        return self.tokenizer.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)


def _one_sequence(input, where: str) -> np.ndarray:
    """Ids [pos] from [pos], [1 pos] or a scalar (TL squeezes the input, then asserts it is 1-D)."""
    if hasattr(input, "detach"):  # a torch tensor
        input = input.detach().cpu()
    arr = np.asarray(input).squeeze()
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1:
        raise InputAssertionError(
            f"{where} takes one sequence of ids, [pos] or [1 pos]; found shape {np.shape(input)}. For a "
            f"batch, call it on each row: [model.{where}(row) for row in tokens].")
    return arr


def _left_padding_mask(tokens: np.ndarray, tokenizer, prepend_bos: bool) -> jax.Array:
    """TL's `get_attention_mask` for left padding: the leading pad tokens are masked, except a BOS equal to
    the pad token (the last of them) when BOS was prepended."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    leading = np.cumsum(tokens != pad, axis=-1) == 0
    mask = ~leading
    if prepend_bos and tok.bos_id(tokenizer) == pad:
        mask[np.arange(tokens.shape[0]), leading.sum(-1) - 1] = True
    return jnp.asarray(mask)
