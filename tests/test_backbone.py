import pytest
import torch
import torch.nn.functional as F

from himatch_med import backbone as backbone_module
from himatch_med.backbone import load_backbone
from himatch_med.errors import WeightsUnavailableError
from himatch_med.features import describe, layout_descriptor


def test_tiny_dinov3_loads_through_the_product_path_and_drops_registers(tiny_dinov3):
    backbone = load_backbone(str(tiny_dinov3), precision="float32")
    assert backbone.prefix == 1 + 4
    assert backbone.stages == (1, 2, 3, 4)
    images = torch.randn(2, 3, 48, 80)  # non-square: 3 x 5 patches
    cls, grids = backbone(images)
    assert cls.shape == (2, 32)
    assert [g.shape for g in grids] == [(2, 3, 5, 32)] * 4
    # Against the model's own tokens: CLS first, then 4 registers, then the patches row by row.
    hidden = backbone.model(pixel_values=images, output_hidden_states=True).hidden_states
    tokens = backbone.model.norm(hidden[4])
    assert tokens.shape[1] == 1 + 4 + 15
    torch.testing.assert_close(cls, F.normalize(tokens[:, 0], dim=-1))
    torch.testing.assert_close(grids[-1][:, 1, 2], F.normalize(tokens[:, 5 + 1 * 5 + 2], dim=-1))
    torch.testing.assert_close(grids[0], F.normalize(backbone.model.norm(hidden[1])[:, 5:], dim=-1).unflatten(1, (3, 5)))
    assert torch.allclose(grids[1].norm(dim=-1), torch.ones(2, 3, 5))


def test_bfloat16_is_the_same_features_within_its_rounding_and_auto_follows_the_device(tiny_dinov3, monkeypatch):
    exact = load_backbone(str(tiny_dinov3), precision="float32")
    half = load_backbone(str(tiny_dinov3), precision="bfloat16")
    images = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    (cls32, grids32), (cls16, grids16) = exact(images), half(images)
    assert cls16.dtype == torch.float32 and not torch.equal(cls16, cls32)  # computed in bf16, returned as float32
    for a, b in zip((cls32, *grids32), (cls16, *grids16)):
        assert F.cosine_similarity(a, b, dim=-1).min() > 0.99
    monkeypatch.setattr(backbone_module, "native_cpu_bf16", lambda: False)
    assert backbone_module.arithmetic("auto", torch.device("cpu")) == "float32"
    assert backbone_module.arithmetic("auto", torch.device("cuda")) == "bfloat16"
    assert backbone_module.arithmetic("bfloat16", torch.device("cpu")) == "bfloat16"
    monkeypatch.setattr(backbone_module, "native_cpu_bf16", lambda: True)
    assert backbone_module.arithmetic("auto", torch.device("cpu")) == "bfloat16"
    with pytest.raises(ValueError, match="precision='half' is not one of"):
        load_backbone(str(tiny_dinov3), precision="half")


def test_chosen_stages_and_bad_stages(tiny_dinov3):
    assert load_backbone(str(tiny_dinov3), stages=(2, 4)).stages == (2, 4)
    with pytest.raises(ValueError, match="only 4 blocks"):
        load_backbone(str(tiny_dinov3), stages=(5,))


def test_dinov2_without_registers(tiny_dinov2):
    backbone = load_backbone(str(tiny_dinov2))
    assert backbone.prefix == 1 and backbone.patch_size == 14
    cls, grids = backbone(torch.randn(1, 3, 28, 42))
    assert grids[-1].shape == (1, 2, 3, 32)
    hidden = backbone.model(pixel_values=torch.randn(1, 3, 28, 42), output_hidden_states=True).hidden_states
    assert hidden[-1].shape[1] == 1 + 6


def test_missing_weights_give_one_clear_message(tmp_path):
    with pytest.raises(WeightsUnavailableError) as raised:
        load_backbone("facebook/dinov3-vits16-pretrain-lvd1689m")
    message = str(raised.value)
    assert "accept the licence" in message and "--model" in message and "dinov2" in message
    with pytest.raises(WeightsUnavailableError, match="no such folder"):
        load_backbone(str(tmp_path / "nowhere"))


def test_layout_descriptor_is_unit_cells_of_the_pooled_grid():
    grid = F.normalize(torch.randn(2, 8, 8, 6), dim=-1)
    layout = layout_descriptor(grid, 4)
    assert layout.shape == (2, 16, 6)
    torch.testing.assert_close(layout.norm(dim=-1), torch.ones(2, 16))
    # Cell (1, 2) averages patches rows 2-3, columns 4-5.
    expected = F.normalize(grid[:, 2:4, 4:6].mean(dim=(1, 2)), dim=-1)
    torch.testing.assert_close(layout[:, 1 * 4 + 2], expected)
    features = describe(torch.randn(2, 6), (grid, grid), 4)
    assert features.grid == (8, 8)


def test_cls_comes_from_the_last_block_whatever_the_stages(tiny_dinov3):
    backbone = load_backbone(str(tiny_dinov3), stages=(2, 1), precision="float32")
    assert backbone.stages == (1, 2)
    images = torch.randn(1, 3, 32, 48)
    cls, grids = backbone(images)
    hidden = backbone.model(pixel_values=images, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cls, F.normalize(backbone.model.norm(hidden[4])[:, 0], dim=-1))
    torch.testing.assert_close(grids[-1], F.normalize(backbone.model.norm(hidden[2])[:, 5:], dim=-1).unflatten(1, (2, 3)))


def _with_custom_code(source, folder, model_type=None):
    """A copy of a saved model whose config points AutoModel at a Python file in the folder (as Hub repos do)."""
    import json
    import shutil

    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_custom.CustomConfig", "AutoModel": "modeling_custom.CustomModel"}
    if model_type:
        config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    marker = folder.parent / f"{folder.name}-ran"
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('custom code ran')\n"
                                               "from transformers import DINOv3ViTConfig as CustomConfig\n"
                                               "from transformers import DINOv3ViTModel as CustomModel\n")
    return folder, marker


@pytest.mark.parametrize("model_type", [None, "custom_vit"])
def test_a_model_folder_with_its_own_code_is_refused_without_running_or_asking(model_type, tiny_dinov3, tmp_path,
                                                                               monkeypatch):
    folder, marker = _with_custom_code(tiny_dinov3, tmp_path / "model", model_type)
    asked = []
    monkeypatch.setattr("builtins.input", lambda *args: asked.append(args) or "y")  # "echo y |" ran the code
    with pytest.raises(WeightsUnavailableError) as raised:
        load_backbone(str(folder))
    message = str(raised.value)
    assert f"--model {folder}: the model folder carries its own Python code" in message
    assert "modeling_custom.CustomModel" in message and "never runs code that comes with weights" in message
    assert "accept the licence" not in message
    assert not asked and not marker.exists()


def test_every_transformers_load_pins_trust_remote_code_off(tiny_dinov3, monkeypatch):
    from transformers import AutoModel

    calls = []
    real = AutoModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModel, "from_pretrained", classmethod(spy))
    load_backbone(str(tiny_dinov3))
    assert calls and all(call.get("trust_remote_code") is False for call in calls)


def test_a_first_download_shows_its_progress(tiny_dinov3):
    """The Hub's progress bars stay on (a first download is hundreds of MB); transformers' own are off."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    load_backbone(str(tiny_dinov3))
    assert not are_progress_bars_disabled()
    assert not hf_logging.is_progress_bar_enabled()


def test_a_backbone_says_what_it_computes_in_and_its_features_are_matched_in_that(tiny_dinov3):
    from himatch_med.detect import matching_dtype

    exact = load_backbone(str(tiny_dinov3), precision="float32")
    half = load_backbone(str(tiny_dinov3), precision="bfloat16")
    assert (exact.arithmetic, matching_dtype(exact)) == ("float32", torch.float32)
    assert (half.arithmetic, matching_dtype(half)) == ("bfloat16", torch.bfloat16)
