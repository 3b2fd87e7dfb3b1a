"""The paper's real backbones (LLaVA-1.5-7B, Qwen2.5-VL-3B) from their published configurations, on the
meta device: parameter names, shapes and counts, the paper's merge sets, curvature files and the cgm-merge
plan, all without weights (`architectures`, `merge_plan`)."""
