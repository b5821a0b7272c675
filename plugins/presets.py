"""Tiny, randomly initialised model presets of every kind, for offline runs.

Dropout is off in every preset: it draws different random numbers under
``torch.compile`` and across ranks, which would hide real loss differences
between backends.
"""

from __future__ import annotations

from ftbench import hookimpl, DECODER, ENCODER, ENCODER_DECODER, ModelPreset


def _specials(tok) -> dict:
    return {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


def _vocab(tok) -> int:
    return len(tok)


def build_gpt2(tokenizer, head="lm", num_labels=None, n_layer=2, n_embd=64, n_head=2, n_positions=512):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=_vocab(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                     num_labels=num_labels or 2, **_specials(tokenizer))
    return GPT2ForSequenceClassification(cfg) if head == "classification" else GPT2LMHeadModel(cfg)


def build_llama(tokenizer, head="lm", num_labels=None):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=_vocab(tokenizer), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attention_dropout=0.0, tie_word_embeddings=True, num_labels=num_labels or 2,
                      **_specials(tokenizer))
    return LlamaForSequenceClassification(cfg) if head == "classification" else LlamaForCausalLM(cfg)


def build_llama_32k(tokenizer, head="lm", num_labels=None):
    """A Llama-family model with a 32k vocabulary (as Llama 2's) and untied output layer: small blocks,
    so that the loss over the vocabulary weighs as it does in a real model (docs/optimizations.md)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=max(_vocab(tokenizer), LLAMA_VOCAB), hidden_size=128, intermediate_size=344,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, attention_dropout=0.0, tie_word_embeddings=False,
                      num_labels=num_labels or 2, **_specials(tokenizer))
    return LlamaForSequenceClassification(cfg) if head == "classification" else LlamaForCausalLM(cfg)


#: Llama 2's vocabulary size.
LLAMA_VOCAB = 32000


def build_smollm2_shape(tokenizer, head="lm", num_labels=None):
    """SmolLM2-135M's architecture (576 wide, 30 layers, 9/3 heads, 49152 vocabulary), random init."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=max(49152, _vocab(tokenizer)), hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=2048, rope_theta=100000.0, attention_dropout=0.0,
                      tie_word_embeddings=True, num_labels=num_labels or 2, **_specials(tokenizer))
    return LlamaForSequenceClassification(cfg) if head == "classification" else LlamaForCausalLM(cfg)


def build_t5(tokenizer, head="lm", num_labels=None):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=_vocab(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                   num_heads=4, dropout_rate=0.0, decoder_start_token_id=tokenizer.pad_token_id,
                   feed_forward_proj="relu", tie_word_embeddings=True, **_specials(tokenizer))
    return T5ForConditionalGeneration(cfg)


def build_bert(tokenizer, head="classification", num_labels=None):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=_vocab(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=512, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=num_labels or 2, pad_token_id=tokenizer.pad_token_id)
    return BertForSequenceClassification(cfg)


def _family(name: str) -> tuple[str, ...]:
    return (f"transformers.models.{name}.modeling_{name}", f"transformers.models.{name}.configuration_{name}")


@hookimpl
def register_models(register):
    register(ModelPreset("tiny-gpt2", DECODER, build_gpt2, default=True, preload=_family("gpt2"),
                         description="GPT-2, 2 layers x 64 wide, 2 heads; random init; offline BPE tokenizer"))
    register(ModelPreset("tiny-llama", DECODER, build_llama, preload=_family("llama"),
                         description="Llama, 2 layers x 64 wide, GQA 4/2 heads; random init; offline BPE tokenizer"))
    register(ModelPreset("llama-32k", DECODER, build_llama_32k, preload=_family("llama"), vocab_size=LLAMA_VOCAB,
                         max_positions=2048,
                         description="Llama, 2 layers x 128 wide, GQA 4/2 heads, 32k vocabulary, untied head; "
                                     "random init"))
    register(ModelPreset("smollm2-135m-shape", DECODER, build_smollm2_shape, preload=_family("llama"),
                         description="SmolLM2-135M's Llama config (576 x 30 layers, 9/3 heads, vocab 49152); "
                                     "random init, offline tokenizer; for memory and speed at a real size"))
    register(ModelPreset("tiny-t5", ENCODER_DECODER, build_t5, default=True, preload=_family("t5"),
                         description="T5, 2+2 layers x 64 wide, 4 heads; random init; offline BPE tokenizer"))
    register(ModelPreset("tiny-bert", ENCODER, build_bert, default=True, preload=_family("bert"),
                         description="BERT, 2 layers x 64 wide, 2 heads; random init; offline BPE tokenizer"))
