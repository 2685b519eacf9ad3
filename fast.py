"""Fast action sampling: the model prepared once for inference, the 10-step Euler loop compiled whole.

The readable reference is model.PoseVLA.sample_actions (eager, per-step denoise_step). This file
runs the same computation (the same PoseVLA.integrate loop) for speed:
  1. prepare once: eval mode, requires_grad off, parameters cast to bf16 on CUDA (fp32 on CPU; the
     RoPE frequency buffers stay fp32), so no per-call autocast over fp32 weights;
  2. static shapes: the prompt is right-padded to a multiple of `prompt_len` tokens (padding keys
     are never attended, so the result is unchanged) and the batch is fixed by the caller, so the
     prefix KV cache has one shape and the compiled graphs never recompile;
  3. prefix(): the prefix keys/values of every layer, computed once per chunk (compiled too; only
     the keys/values are returned, so the last layer's unused prefix MLP is dropped from the graph);
  4. denoise(kvs, p_valid, state, noise) -> actions: all flow_steps Euler steps in ONE graph: the
     step count and t schedule are Python constants, nothing reads a tensor value on the host;
     attention is joint.joint_layer's single scaled_dot_product_attention with the joint mask;
  5. on CUDA both graphs are compiled with mode="reduce-overhead" (CUDA graphs: one launch per
     graph replay), on CPU with inductor's default C++ kernels.

    sampler = FastSampler(model)            # compiles on the first call (seconds to a minute)
    actions = sampler(batch, noise)         # (B, H, max_dim) fp32, == model.sample_actions(batch, noise)
"""
import torch
import torch.nn.functional as F

from model import PoseVLA

FLOAT_KEYS = ("images", "rays", "depth", "state")


class FastSampler:
    def __init__(self, model: PoseVLA, compile=True, prompt_len=32, dtype=None):
        """Prepares `model` in place (its parameters are cast); dtype: bf16 on CUDA, fp32 elsewhere."""
        device = next(model.parameters()).device
        self.dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.model = model.eval().requires_grad_(False)
        for p in model.parameters():  # buffers (the RoPE frequencies) stay fp32; tied weights stay tied
            p.data = p.data.to(self.dtype)
        self.device, self.prompt_len = device, prompt_len
        self.prefix_fn, self.denoise_fn = self.prefix, self.denoise
        if compile:
            mode = "reduce-overhead" if device.type == "cuda" else None
            self.prefix_fn = torch.compile(self.prefix, fullgraph=True, dynamic=False, mode=mode)
            self.denoise_fn = torch.compile(self.denoise, fullgraph=True, dynamic=False, mode=mode)

    def prepare(self, batch):
        """The batch on the device in the model's dtype, its prompt padded to a multiple of prompt_len."""
        batch = {k: v.to(self.device, self.dtype if k in FLOAT_KEYS else None) for k, v in batch.items()
                 if k in FLOAT_KEYS or k in ("view_mask", "has_rays", "has_depth", "prompt_ids", "prompt_mask")}
        pad = -batch["prompt_ids"].shape[1] % self.prompt_len
        batch["prompt_ids"] = F.pad(batch["prompt_ids"], (0, pad), value=self.model.cfg.pad_id)  # (B, Lp')
        batch["prompt_mask"] = F.pad(batch["prompt_mask"], (0, pad), value=False)
        return batch

    def prefix(self, batch):
        """Per-layer prefix (k, v), each (B, KV, Tp, hd), and the (B, Tp) prefix validity."""
        kvs, p_valid, _ = self.model.encode_prefix(batch)
        return kvs, p_valid

    def denoise(self, kvs, p_valid, state, noise):
        """Integrate the flow from noise (t=1) to actions (t=0), flow_steps Euler steps of
        dt = -1/flow_steps with the cached prefix. noise: (B, H, D) fp32 -> (B, H, D) fp32."""
        return self.model.integrate(  # x_t in the model's dtype, the velocity (B, H, D) back in fp32
            noise, lambda x_t, t: self.model.denoise_step(kvs, p_valid, state, x_t.to(self.dtype), t).float())

    @torch.no_grad()
    def __call__(self, batch, noise):
        """The chunk (B, H, max_dim) fp32 for a model batch and (B, H, max_dim) flow noise."""
        batch = self.prepare(batch)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous chunk's graph outputs may be reused
        kvs, p_valid = self.prefix_fn(batch)
        actions = self.denoise_fn(kvs, p_valid, batch["state"], noise.to(self.device, torch.float32))
        return actions.clone()
