"""The Pose-VLA model's config: PoseVLAConfig and its two presets (method.md §5, §6).

  - PoseVLAConfig: the PaliGemma config as a plain dict (the VLM's shape), the action expert's
    width, views, state/action width, chunk, flow steps, geometry priors and the token ids the
    model needs (filled in by model.build_model from the text tokenizer);
  - paligemma_dict(): a PaliGemma config dict from the handful of numbers that define its shape;
  - the presets `tiny` (CPU/tests) and `paligemma-3b` (the paper), by name in CONFIGS.
A checkpoint's config.json is asdict(PoseVLAConfig) (model.save_checkpoint).
"""
from dataclasses import dataclass, field

from transformers import PaliGemmaConfig


@dataclass
class PoseVLAConfig:
    # Which of CONFIGS this config was built from, written at build time so a checkpoint names its
    # preset (learning rates follow it, trainer.default_rates). None: built by hand, or a checkpoint
    # from before the field (trainer.config_name then recognises the preset by its shapes).
    preset: str | None = None
    # The PaliGemma config as a plain dict (PaliGemmaConfig.to_dict()): the single source of truth
    # for the VLM's shape, so a checkpoint rebuilds exactly the network it was trained with.
    vlm: dict = field(default_factory=dict)
    # Action expert: same depth/heads/head_dim as the Gemma decoder (joint attention needs that),
    # a smaller width (pi0: 1024 next to Gemma's 2048) because actions carry far less information.
    expert_width: int = 128
    expert_mlp: int = 512
    n_views: int = 3          # RoboTwin: head + two wrist cameras
    max_dim: int = 32         # state/action vectors are zero-padded to this width (pi0)
    action_horizon: int = 16  # RoboTwin recipe: chunk of 16
    flow_steps: int = 10      # Euler steps at inference, dt = -1/flow_steps
    use_rays: bool = True
    use_depth: bool = True
    prior_dropout: float = 0.5  # each prior dropped per sample: works with RGB only or any subset
    # Token ids filled in by model.build_model from the text tokenizer.
    image_start_ids: list = field(default_factory=list)  # <image{i}>
    image_end_ids: list = field(default_factory=list)    # </image{i}>
    # [first, end) id ranges of the value tokens: <loc>, then each pose quantity's bins (model.decode_step).
    value_groups: list = field(default_factory=list)
    bos_id: int = 0
    eos_id: int = 1
    pad_id: int = 0

    @property
    def text(self):
        return self.vlm["text_config"]

    @property
    def vision(self):
        return self.vlm["vision_config"]

    @property
    def image_size(self):
        return self.vision["image_size"]

    @property
    def tokens_per_view(self):
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2


def paligemma_dict(image_size, patch, v_width, v_depth, v_heads, v_mlp,
                   width, depth, heads, kv_heads, head_dim, mlp, vocab_size=257216, image_token=257152):
    """A PaliGemma config dict from the handful of numbers that define its shape."""
    vision = dict(model_type="siglip_vision_model", image_size=image_size, patch_size=patch,
                  hidden_size=v_width, num_hidden_layers=v_depth, num_attention_heads=v_heads,
                  intermediate_size=v_mlp, vision_use_head=False)
    text = dict(model_type="gemma", hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=mlp,
                vocab_size=vocab_size, hidden_act="gelu_pytorch_tanh")
    return PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=width, hidden_size=width,
                           vocab_size=vocab_size, image_token_index=image_token).to_dict()


def tiny_config(**overrides):
    """A few million parameters: 112 px views with patch 14 (64 tokens each), 4 Gemma layers."""
    vlm = paligemma_dict(image_size=112, patch=14, v_width=128, v_depth=2, v_heads=4, v_mlp=512,
                         width=256, depth=4, heads=4, kv_heads=1, head_dim=64, mlp=1024)
    cfg = PoseVLAConfig(preset="tiny", vlm=vlm, expert_width=128, expert_mlp=512)
    return _override(cfg, overrides)


def paligemma_3b_config(**overrides):
    """google/paligemma-3b-pt-224: SigLIP So400m/14 at 224 px, Gemma 2B; pi0's 300M expert."""
    vlm = paligemma_dict(image_size=224, patch=14, v_width=1152, v_depth=27, v_heads=16, v_mlp=4304,
                         width=2048, depth=18, heads=8, kv_heads=1, head_dim=256, mlp=16384)
    cfg = PoseVLAConfig(preset="paligemma-3b", vlm=vlm, expert_width=1024, expert_mlp=4096)
    return _override(cfg, overrides)


CONFIGS = {"tiny": tiny_config, "paligemma-3b": paligemma_3b_config}


def _override(cfg, overrides):
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown PoseVLAConfig field {k!r}")
        setattr(cfg, k, v)
    return cfg
