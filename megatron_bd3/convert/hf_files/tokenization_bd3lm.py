"""The sentencepiece tokenizer of a BD3-LM for Hugging Face transformers.

Written for megatron_bd3 and shipped (with ``tokenizer.model``) inside the model directories it
exports whose tokenizer is a sentencepiece model: ``AutoTokenizer.from_pretrained(directory,
trust_remote_code=True)`` then gives the ids megatron_bd3 trained with. The whole text goes to
sentencepiece in one call (no splitting on special-token strings first, which would change
where sentencepiece puts its word-boundary marks), so a literal "[MASK]" in text is text, never
the absorbing [MASK] id; decoding drops [MASK], BOS, EOS and PAD and lets sentencepiece join the
pieces. [MASK] is the model's "[MASK]" piece, or the id after the last piece when the model has
none.
"""

from __future__ import annotations

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class BD3LMTokenizer(SentencePieceBackend):
    """sentencepiece ids exactly as ``sentencepiece.SentencePieceProcessor.encode`` gives them."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs) -> None:
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("add_bos_token", False)
        kwargs.setdefault("add_eos_token", False)
        super().__init__(vocab_file=vocab_file, **kwargs)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        # BD3 training data carries no added specials inside a text; nothing is added here
        return list(token_ids_0) + (list(token_ids_1) if token_ids_1 is not None else [])

    def _decode(self, token_ids, skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: bool | None = None, **kwargs) -> str:
        del skip_special_tokens, clean_up_tokenization_spaces, kwargs
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        pieces = self.sp_model.get_piece_size()
        dropped = {self.mask_token_id, self.bos_token_id, self.eos_token_id, self.pad_token_id}
        return self.sp_model.decode([int(t) for t in token_ids
                                     if int(t) not in dropped and int(t) < pieces])
