"""Language and vision-language models of the tiny checkpoints (:mod:`editbench.tiny`): LLaVA
(llava-hf layout), LLaMA, CLIP, T5 and BLIP-2 (OPT), built from shrunk configs.
"""

from __future__ import annotations

from editbench.tiny_tokenizers import CLIP_MAX_LENGTH, IMAGE_TOKEN, LM_MAX_LENGTH, _lm_tokenizer

BLIP2_QUERY_TOKENS = 4


def _clip_vision_config(**overrides):
    from transformers import CLIPVisionConfig

    kwargs = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        hidden_act="quick_gelu",
    )
    kwargs.update(overrides)
    return CLIPVisionConfig(**kwargs)


def _image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _llama_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=LM_MAX_LENGTH,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _make_llava(tokenizer):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = _clip_vision_config()
    config = LlavaConfig(
        vision_config=vision,
        text_config=_llama_config(tokenizer),
        image_token_id=image_token_id,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,  # CLS dropped
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=_image_processor(),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token; "default" drops it again
    )
    return model, processor


def _make_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(
        text_config=text, vision_config=_clip_vision_config().to_dict(), projection_dim=32
    )
    processor = CLIPProcessor(image_processor=_image_processor(), tokenizer=tokenizer)
    return CLIPModel(config), processor


def _make_blip2(corpus: list[str]):
    """BLIP-2 with an OPT language model (the captioner `Salesforce/blip2-opt-2.7b` shrunk):
    ViT 32 px / patch 8 / width 32, a 2-layer Q-Former with cross-attention in every layer,
    4 query tokens, a 2-layer OPT. The processor adds `<image>` to the byte-level tokenizer
    (as an `AddedToken`: a tokenizer whose `image_token` is a plain string breaks
    `Blip2Processor` in transformers 5.23) and `image_token_index` points at it: with the
    default None `generate` crashes (REFERENCE.md, "MMIG's building blocks")."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    tokenizer = _lm_tokenizer(corpus, image_token=False)
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        num_query_tokens=BLIP2_QUERY_TOKENS,
    )
    vision = Blip2VisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        cross_attention_frequency=1,
    )
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=LM_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=BLIP2_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    return Blip2ForConditionalGeneration(config), processor


def _make_t5(tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",  # Flan-T5
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5ForConditionalGeneration(config)
