"""Device placement of the training step, checked on the CPU.

The suite runs without a GPU, so a tensor created on the CPU and then combined with batch tensors
that accelerate has moved to the GPU goes unnoticed here (issue 12: SDXL's time ids crashed every
GPU run at its first step). The ``meta`` device catches the same class of bug on the CPU: meta
tensors refuse to meet CPU tensors in ``cat`` / arithmetic just as cuda tensors do, and the whole
step (VAE encode, text encoders, UNet, loss) runs on meta without computing anything. The cuda
versions of these checks are in ``test_cuda.py``."""


import pytest
import torch

from dashdiff.testing import resolve_model
from launch_utils import ROOT

SCRIPT = ROOT / "train" / "dreambooth_dash.py"
META = torch.device("meta")


def _meta_models(db, model: str, prediction_type: str):
    path = resolve_model(model)
    family = db.detect_family(path)
    args = db.parse_args(["--pretrained_model_name_or_path", path, "--instance_data_dir", str(ROOT / "assets" / "subject"),
                          "--instance_prompt", "a photo of sks toy", "--resolution", "64", "--output_dir", "unused",
                          "--report_to", "none", "--snr_gamma", "5", "--with_prior_preservation",
                          "--class_prompt", "a photo of a toy", "--class_data_dir", "unused"])
    db.resolve_defaults(args, family)
    models = db.load_models(args, family, path, torch.float32)
    models.noise_scheduler.register_to_config(prediction_type=prediction_type)
    for m in (models.vae, models.unet, *models.text_encoders):
        m.to(META)
    return models, args


def _batch(n: int, latents: bool) -> dict:
    """A collated micro-batch (instance + class halves) as the prepared dataloader hands it over:
    every tensor already on the training device."""
    batch = {"original_size": torch.full((n, 2), 64, dtype=torch.long, device=META),
             "crop_top_left": torch.zeros(n, 2, dtype=torch.long, device=META),
             "prompts": ["a photo of sks toy"] * (n // 2) + ["a photo of a toy"] * (n - n // 2)}
    if latents:
        batch["latent_params"] = torch.zeros(n, 8, 8, 8, device=META)  # --cache_latents: mean and logvar
    else:
        batch["pixel_values"] = torch.zeros(n, 3, 64, 64, device=META)
    return batch


@pytest.mark.parametrize("model,prediction_type", [("tiny-sdxl", "epsilon"), ("tiny-sd", "v_prediction")])
def test_training_step_creates_nothing_off_the_batch_device(db, model, prediction_type):
    """draw_inputs and the loss (Min-SNR weights, prior mask, SDXL time ids, the AutoLoRA doubled
    batch) with every model and batch tensor on ``meta``: a tensor made on the CPU raises."""
    models, args = _meta_models(db, model, prediction_type)
    gen = torch.Generator().manual_seed(0)  # the scripts' CPU generators stay on the CPU
    loss_fn = db.LossFn(models, args, db.PromptCache(), models.text_encoders, prior=True)
    for latents in (False, True):
        inputs = db.draw_inputs(_batch(2, latents), models, gen, META, args, torch.float32)
        tensors = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
        assert {k: v.device for k, v in tensors.items()} == {k: META for k in tensors}
        if models.family == "sdxl":
            assert inputs["time_ids"].shape == (2, 6)
        for step_inputs in (inputs, db.double_inputs(inputs)):
            loss = loss_fn(models.unet, step_inputs)
            assert loss.device == META and loss.shape == ()
