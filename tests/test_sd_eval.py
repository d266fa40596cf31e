"""``sd --compare`` and ``sd-eval`` offline, on a tiny Stable Diffusion pipeline and a tiny CLIP
model built from configs (the CLIP image tower serves as the FID feature extractor)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")

from test_diffusion import tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_clip(tmp_path):
    """A tiny CLIPModel + CLIPProcessor (the tiny pipeline's character tokenizer) saved under tmp_path/clip."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    pipe = tiny_pipeline(tmp_path)
    vocab = pipe.tokenizer.vocab_size
    torch.manual_seed(1)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=pipe.tokenizer)
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    return model, processor


def test_metrics_fail_when_they_should(tmp_path):
    from agent_attention.bench import sd_quality

    model, processor = tiny_clip(tmp_path)
    feature = sd_quality.ClipImageFeatures(model, processor)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    assert sd_quality.fid(a, a, feature) == pytest.approx(0.0, abs=1e-3)
    far = sd_quality.fid(a, (b // 4).to(torch.uint8), feature)
    assert far > sd_quality.fid(a, b, feature) > 1e-3  # darker images: farther
    # CLIP score: 100·max(cos, 0) of the tower's embeddings, computed here from the model directly
    prompts = ["a cat", "a dog", "red", "blue", "sky", "tree"]
    tok = processor(text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        t = model.get_text_features(**tok)
        t = getattr(t, "pooler_output", t)
        pix = processor(images=list(a), return_tensors="pt")["pixel_values"]
        i = model.get_image_features(pixel_values=pix)
        i = getattr(i, "pooler_output", i)
    cos = torch.nn.functional.cosine_similarity(i, t, dim=-1)
    expected = (100 * cos.clamp(min=0)).mean().item()
    assert sd_quality.clip_score(a, prompts, model, processor) == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_memory_per_image_is_the_batch_increment():
    from agent_attention.bench.sd_quality import memory_per_image

    def run(batch):  # 1 MiB per image on top of a fixed 4 MiB
        fixed = torch.empty(4 * 2**20, dtype=torch.uint8)
        per = torch.empty(batch * 2**20, dtype=torch.uint8)
        return fixed.sum() + per.sum()

    mem = memory_per_image(run, torch.device("cpu"))
    assert abs(mem["per_image"] - 2**20) < 2**16


def test_sd_eval_cli(tmp_path, capsys):
    from agent_attention.commands.sd_eval import main

    tiny_pipeline(tmp_path).save_pretrained(tmp_path / "model")
    tiny_clip(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n# a comment\n\na dog\nred sky\n")
    report = tmp_path / "report.json"
    rc = main(["--model", str(tmp_path / "model"), "--prompts", str(prompts), "--steps", "2", "--warmup", "0",
               "--clip", str(tmp_path / "clip"), "--json", str(report), "--save-images", str(tmp_path / "images"),
               "--memory-steps", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "CLIP score" in out and "FID vs baseline" in out and "'agent'" in out
    data = json.loads(report.read_text())
    assert data["prompts"] == ["a cat", "a dog", "red sky"] and data["fid_features"] == "clip"
    assert data["calls"].get("agent", 0) > 0
    for name in ("baseline", "agentsd"):
        r = data[name]
        assert r["s_per_image"] > 0 and 0 <= r["clip_score"] <= 100 and r["memory"]["per_image"] > 0
    assert data["baseline"]["fid_vs_baseline"] == 0.0 and data["agentsd"]["fid_vs_baseline"] > 0  # AgentSD changed the images
    assert len(list((tmp_path / "images").glob("*.png"))) == 6
    # bad input: one line, exit code 2
    assert main(["--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "none.txt")]) == 2
    assert main(["--model", str(tmp_path / "model"), "--prompts", str(prompts), "--fid", "clip"]) == 2
    assert "needs --clip" in capsys.readouterr().err


def test_sd_compare_seeds_grid(tmp_path, capsys):
    from PIL import Image

    from agent_attention.commands.sd import main

    tiny_pipeline(tmp_path).save_pretrained(tmp_path / "model")
    out = tmp_path / "grid.png"
    args = ["--model", str(tmp_path / "model"), "--prompt", "a cat", "--steps", "2", "--warmup", "0", "--seeds", "1", "2"]
    assert main(args + ["--compare", "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.width == 64 and image.height == 2 * 32 + 14  # two seeds × (baseline, AgentSD)
    assert "speed-up" in capsys.readouterr().out
    assert main(args + ["--no-compare", "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.width == 32 and image.height == 64


def test_video_output_becomes_first_middle_last_frames():
    from types import SimpleNamespace

    import numpy as np

    from agent_attention.commands._sd_pipe import pipeline_kwargs, to_pil

    frames = np.zeros((1, 9, 4, 6, 3), dtype=np.float32)
    for i in range(9):
        frames[0, i] = i / 8
    (strip,) = to_pil(SimpleNamespace(frames=frames))
    assert strip.size == (18, 4)
    px = np.asarray(strip)
    assert px[0, 0, 0] == 0 and px[0, 6, 0] == 128 and px[0, 12, 0] == 255  # frames 0, 4, 8

    class Pipe:
        def __call__(self, prompt, num_inference_steps=1, num_frames=None):
            pass

    assert pipeline_kwargs(Pipe(), num_inference_steps=3, num_frames=None, guidance_scale=2.0) == {"num_inference_steps": 3}


def tiny_pixart_pipeline(path):
    """A tiny PixArtSigmaPipeline (word-level tokenizer, 1-layer T5 encoder) saved under ``path``."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in "a cat dog red sky in the snow".split():
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                        model_max_length=16)
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=12, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                           relative_attention_num_buckets=8)).eval()
    transformer = PixArtTransformer2DModel(
        sample_size=32, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=12, patch_size=2, norm_num_groups=1, use_additional_conditions=False).eval()
    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32).eval()
    PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(path)
    return path


def test_sd_compare_and_eval_on_a_transformer_pipeline(tmp_path, capsys):
    """Both commands take a DiT pipeline (here PixArt-Σ): its transformer is patched, agent calls counted."""
    from agent_attention.commands.sd import main as sd_main
    from agent_attention.commands.sd_eval import main as eval_main

    model = str(tiny_pixart_pipeline(tmp_path / "pixart"))
    assert sd_main(["--model", model, "--prompt", "a cat", "--steps", "2", "--warmup", "0", "--out", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out  # step 0 with agents, step 1 ToMe (the schedule switches at 40 %)
    assert "PixArtSigmaPipeline" in out and "{'agent': 2, 'tome': 2}" in out and "warning" not in out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    assert eval_main(["--model", model, "--prompts", str(prompts), "--steps", "2", "--warmup", "0", "--no-memory",
                      "--json", str(tmp_path / "r.json")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["pipeline"] == "PixArtSigmaPipeline" and data["calls"]["agent"] == 4 and data["fid_features"] == "none"
