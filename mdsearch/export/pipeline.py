"""Caption to image from an exported bundle, in ONNX Runtime and numpy: no PyTorch model.

    bundle = Bundle("out/md")                   # reads and checks manifest.json, loads the graphs
    result = bundle.generate("a red circle above a blue square", seed=0)
    result.pixels, result.latency               # (3, H, W) in [-1, 1]; ms per component
    print(latency_table([result]))

    result = generate("out/md", "a red circle", out="red.png", check="runs/md")
    result.max_abs_diff                         # against the same image through PyTorch

What an app re-implements, step by step (the manifest gives every number):

1. Text: the caption, tokenised with `tokenizer/` padded to `text_encoder.max_length`, through
   `text_encoder.onnx` gives the context (1, L, D). With guidance (`sampler.guidance` != 1) the
   null caption `text_encoder.null_caption` ("") gives the null context the same way: that is
   what training conditions on when it drops a caption, and what it samples with
   (`DataPipeline.null_context` is the empty caption's embedding, from the same encoder).
2. Noise: (1, latent_channels, latent_size, latent_size) standard normal. Here it is
   `torch.randn` from `torch.Generator().manual_seed(seed)` so that a seed gives exactly the
   image PyTorch gives (`reference_image`), and seed 12345 starts from the noise training's
   evaluation samples start from; an app draws its own. (torch serves only this and the
   schedule's alpha_bar table, `NoiseSchedule`'s, so that both are training's by construction.)
3. Sampling (numpy): DDIM with eta 0, as `mdsearch.train.diffusion.ddim_sample`. Over `steps`
   timesteps t_i = round(linspace(T - 1, 0, steps)) (T = `noise_schedule.train_steps`; the
   linspace in float32, as torch's: float64 gives other timesteps for 136 of the step counts
   1..1000), with alpha_bar from `noise_schedule.kind`: the UNet predicts on (x, t_i, context),
   and with guidance g also on (x, t_i, null context), pred = uncond + g (cond - uncond) (two
   UNet calls a step; batch 1 graphs). x0 and eps from pred (`prediction`: epsilon, or v); in
   pixel space (`clip_x0`: 1) x0 is clamped to [-1, 1] and eps recomputed from it; then
   x = sqrt(alpha_bar_next) x0 + sqrt(1 - alpha_bar_next) eps, and the last step's x0 is the
   sample. A one-step (UFOGen) bundle is the same with 1 step (t = T - 1) and guidance 1: one
   UNet call.
4. Decoding: `decoder.onnx` maps the sample to the image in [-1, 1]; in pixel space
   (`files.decoder` null) the sample is the image, clamped to [-1, 1]. The PNG's pixels are
   round((x + 1) * 127.5).

Parity: `generate(..., check=RUN_DIR)` (`mdsearch generate --check RUN_DIR`) makes the same image
through PyTorch from the run directory (`reference_image`: the checkpoint's EMA UNet, the
PyTorch text encoder, `ddim_sample`, the autoencoder's `decode`) and reports the largest
absolute pixel difference, on the [-1, 1] scale. Measured on fp32 bundles on this project's
2-core CPU (docs/export.md), 8 to 12 images each: at most 1.4e-6 for a trained pixel-space
md-lite proxy (20 DDIM steps, guidance 3), 1.0e-6 for a one-step UFOGen run, 2.1e-6 for a tiny
random UNet with a tiny random diffusers AutoencoderKL. `PARITY_TOLERANCE` is 1e-4 (fp32): 50x
that, for larger models' longer sums, and still 1/80 of one 8-bit level of the PNG. fp16
bundles are not held to it.

Latency: each graph is called once at load (ONNX Runtime's first call allocates), then every
call of an image is timed: `Latency` holds the median ms per call of the text encoder, the UNet
and the decoder, how many calls each made, and the whole image's wall time (tokenising, every
call, the sampler's arithmetic and decoding), on the ONNX Runtime CPU provider.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..progress import quiet
from ..rundir import atomic_path
from .manifest import Manifest, read_manifest
from .onnx import ExportError, compare, cpu_session

PARITY_TOLERANCE = 1e-4  # largest |ORT - PyTorch| pixel difference of an fp32 bundle, in [-1, 1]
PIXEL_TOLERANCE = 1 / 127.5
"""`generate --check` of an fp32 bundle fails above one 8-bit level of a [-1, 1] image: a
difference the PNG shows, so the bundle does not reproduce the run (another run, or a broken
export). Looser than PARITY_TOLERANCE, which the tests hold sampled images to: an
epsilon-prediction model's one-step image divides the UNet's output by sqrt(alpha_bar_T) (157x
for the linear schedule), and float rounding grows with it."""


# --- The sampler, in numpy -----------------------------------------------------------------------

def alphas_cumprod(kind: str, train_steps: int) -> np.ndarray:
    """alpha_bar_t of the noise schedule the UNet was trained on, float32 (T,)."""
    from ..train.diffusion import NoiseSchedule

    return NoiseSchedule(steps=train_steps, kind=kind).alphas_cumprod.numpy()


def ddim_timesteps(train_steps: int, steps: int) -> np.ndarray:
    """round(linspace(T - 1, 0, steps)) as `ddim_sample` takes them: torch's float32 linspace
    (the first half counted up from the start, the rest down from the end) rounded half to
    even."""
    if steps == 1:
        return np.array([train_steps - 1], dtype=np.int64)
    start, end = np.float32(train_steps - 1), np.float32(0)
    step = (end - start) / np.float32(steps - 1)
    i = np.arange(steps)
    values = np.where(i < steps // 2, start + step * i.astype(np.float32),
                      end - step * (steps - 1 - i).astype(np.float32))
    return np.round(values.astype(np.float32)).astype(np.int64)


def ddim(unet, noise: np.ndarray, context: np.ndarray, null_context: np.ndarray | None,
         alphas: np.ndarray, prediction: str, steps: int, guidance: float,
         clip_x0: float | None) -> np.ndarray:
    """Deterministic DDIM (eta 0) from `noise` with classifier-free guidance, as
    `ddim_sample`; `unet(x, t, context)` is one batch-1 UNet call."""
    x = noise.astype(np.float32)
    times = ddim_timesteps(len(alphas), steps)
    for i, t in enumerate(times):
        tt = np.array([t], dtype=np.float32)
        if guidance == 1.0:
            pred = unet(x, tt, context)
        else:
            cond, uncond = unet(x, tt, context), unet(x, tt, null_context)
            pred = uncond + np.float32(guidance) * (cond - uncond)
        s, r = np.sqrt(alphas[t]), np.sqrt(1 - alphas[t])
        if prediction == "epsilon":
            x0, eps = (x - r * pred) / s, pred
        else:
            x0, eps = s * x - r * pred, r * x + s * pred
        if clip_x0 is not None:  # keep x0 in the data range, and eps consistent with it
            x0 = np.clip(x0, -clip_x0, clip_x0)
            eps = (x - s * x0) / r
        if i + 1 < len(times):
            a_next = alphas[times[i + 1]]
            x = np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps
        else:
            x = x0
    return x


def initial_noise(shape: tuple, seed: int) -> np.ndarray:
    """The sampler's starting noise: what `ddim_sample` draws from torch.Generator(seed)."""
    import torch

    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, as the metrics quantise images."""
    return np.clip(np.round((pixels + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def image_path(path: str | Path) -> Path:
    """A path an image may be written to: not a folder."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path}: a folder; give the image file to write, e.g. {path}/img.png")
    return path


def write_png(pixels: np.ndarray, path: str | Path) -> Path:
    """The image (3, H, W) in [-1, 1] as a PNG at `path`, written atomically."""
    from PIL import Image

    path = image_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(pixels)).save(tmp, format="PNG")
    return path


# --- The bundle ----------------------------------------------------------------------------------

@dataclass
class Latency:
    """Milliseconds on the ONNX Runtime CPU provider: the median of each graph's calls for one
    image, the calls, and the image's whole wall time (`total_ms`)."""

    text_encoder_ms: float
    text_encoder_calls: int
    unet_ms: float
    unet_calls: int
    decoder_ms: float | None  # None: pixel space, no decoder
    decoder_calls: int
    total_ms: float


@dataclass
class Generated:
    """One image from a bundle. `pixels` (3, H, W) float32 in [-1, 1]; `path` the PNG once
    written; `max_abs_diff` the largest pixel difference from PyTorch's image once checked."""

    prompt: str
    seed: int
    sampler: str
    steps: int
    guidance: float
    pixels: np.ndarray = field(repr=False)
    latency: Latency
    path: str | None = None
    max_abs_diff: float | None = None
    within_tolerance: bool | None = None  # max_abs_diff <= PIXEL_TOLERANCE, once checked

    def describe(self) -> str:
        """'20 steps, guidance 3, seed 0'."""
        return (f"{self.steps} step{'s' if self.steps != 1 else ''}, guidance "
                f"{self.guidance:g}, seed {self.seed}")

    def to_dict(self) -> dict:
        """The fields but the pixels, and the image's size."""
        data = {k: v for k, v in asdict(self).items() if k != "pixels"}
        return {**data, "size": list(self.pixels.shape[1:])}


class Graph:
    """One ONNX Runtime session of a bundle: float inputs are cast to the graph's precision and
    the output to float32; each call's wall time is kept in `times` (ms)."""

    def __init__(self, manifest: Manifest, name: str):
        self.path = manifest.path(name)
        try:
            self.session = cpu_session(self.path)
        except Exception as err:  # onnxruntime raises its own types for a damaged file
            raise ExportError(f"{self.path}: not a loadable ONNX graph "
                              f"({' '.join(str(err).split())[:200]})") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.times: list[float] = []

    def shape(self, name: str) -> list:
        return list(self.inputs[name].shape) if name in self.inputs else []

    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        cast = {}
        for name, value in feeds.items():
            if name not in self.inputs:
                continue  # e.g. a CLIP graph takes no attention mask
            kind = self.inputs[name].type
            cast[name] = value.astype(np.float16 if kind == "tensor(float16)" else
                                      np.float32 if kind == "tensor(float)" else np.int64)
        tick = time.perf_counter()
        out = self.session.run(None, cast)[0]
        self.times.append((time.perf_counter() - tick) * 1000)
        return out.astype(np.float32)


class Bundle:
    """A bundle folder ready to generate: its manifest (read and checked), tokenizer and
    graphs, each graph called once to warm it up (`warmup=False`: not)."""

    def __init__(self, folder: str | Path, warmup: bool = True):
        self.manifest = m = read_manifest(folder)
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(m.path("tokenizer")),
                                                           local_files_only=True)
        except (OSError, ValueError) as err:
            raise ExportError(f"{m.folder / 'manifest.json'}: field files.tokenizer: "
                              f"{m.path('tokenizer')} is not a tokenizer folder "
                              f"({' '.join(str(err).split())[:200]})") from None
        self.text_encoder, self.unet = Graph(m, "text_encoder"), Graph(m, "unet")
        self.decoder = Graph(m, "decoder") if m.files.decoder is not None else None
        self.latent_shape = (1, m.latent_channels, m.latent_size, m.latent_size)
        self._check_shapes()
        self.alphas = alphas_cumprod(m.noise_schedule.kind, m.noise_schedule.train_steps)
        if warmup:
            self.run(self.encode(""), self.encode(""), np.zeros(self.latent_shape, np.float32),
                     steps=1, guidance=1.0)

    def _check_shapes(self) -> None:
        """ExportError unless the graphs take the sizes the manifest says."""
        m = self.manifest
        for graph, field_name, takes in ((self.unet, "unet", {"latents", "timesteps", "context"}),
                                         (self.decoder, "decoder", {"latents"})):
            if graph is not None and set(graph.inputs) != takes:
                raise ExportError(f"{m.folder / 'manifest.json'}: field files.{field_name}: "
                                  f"{graph.path} takes {', '.join(sorted(graph.inputs))}, not "
                                  f"the {field_name}'s {', '.join(sorted(takes))} (another "
                                  "graph of the bundle?)")
        context = [1, m.text_encoder.max_length, m.text_encoder.dim]
        for graph, name, field_name, expected in (
                (self.unet, "latents", "latent_size", list(self.latent_shape)),
                (self.unet, "context", "text_encoder", context),
                (self.text_encoder, "input_ids", "text_encoder.max_length",
                 [1, m.text_encoder.max_length]),
                (self.decoder, "latents", "latent_size", list(self.latent_shape))):
            if graph is not None and graph.shape(name) != expected:
                raise ExportError(f"{m.folder / 'manifest.json'}: field {field_name}: "
                                  f"{graph.path} takes {name} of shape {graph.shape(name)}, "
                                  f"not the {expected} the manifest says")

    def encode(self, caption: str) -> np.ndarray:
        """The context (1, L, D) of one caption: tokeniser, then the text encoder graph."""
        batch = self.tokenizer([caption], padding="max_length", truncation=True,
                               max_length=self.manifest.text_encoder.max_length,
                               return_tensors="np")
        return self.text_encoder(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"])

    def run(self, context: np.ndarray, null_context: np.ndarray | None, noise: np.ndarray,
            steps: int, guidance: float) -> np.ndarray:
        """Sample and decode: the image (3, H, W) in [-1, 1]."""
        m = self.manifest
        latents = ddim(lambda x, t, c: self.unet(latents=x, timesteps=t, context=c), noise,
                       context, null_context, self.alphas, m.noise_schedule.prediction, steps,
                       guidance, m.clip_x0)
        image = self.decoder(latents=latents) if self.decoder else latents
        if image.shape[-2:] != (m.resolution, m.resolution):  # (first met in the warm-up run)
            raise ExportError(f"{m.folder / 'manifest.json'}: fields resolution and "
                              f"autoencoder.factor say {m.resolution} px, but "
                              f"{self.decoder.path if self.decoder else 'the UNet'} gives "
                              f"{image.shape[-1]}x{image.shape[-2]} images")
        return np.clip(image, -1, 1)[0]

    def generate(self, prompt: str, seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, noise: np.ndarray | None = None) -> Generated:
        """One image of `prompt`: the manifest's sampler, steps and guidance unless given;
        the noise from `seed` unless given."""
        m = self.manifest
        steps = m.sampler.steps if steps is None else steps
        guidance = m.sampler.guidance if guidance is None else guidance
        if not 1 <= steps <= m.noise_schedule.train_steps:
            raise ExportError(f"steps {steps}: must be in 1..{m.noise_schedule.train_steps}")
        if noise is None:
            noise = initial_noise(self.latent_shape, seed)
        elif tuple(noise.shape) != self.latent_shape:
            raise ExportError(f"noise of shape {tuple(noise.shape)}: the bundle samples "
                              f"{self.latent_shape}")
        for graph in (self.text_encoder, self.unet, self.decoder):
            if graph is not None:
                graph.times = []
        tick = time.perf_counter()
        context = self.encode(prompt)
        null = self.encode(m.text_encoder.null_caption) if guidance != 1.0 else None
        pixels = self.run(context, null, noise, steps, guidance)
        total = (time.perf_counter() - tick) * 1000
        decoder = self.decoder.times if self.decoder else []
        latency = Latency(
            text_encoder_ms=statistics.median(self.text_encoder.times),
            text_encoder_calls=len(self.text_encoder.times),
            unet_ms=statistics.median(self.unet.times), unet_calls=len(self.unet.times),
            decoder_ms=statistics.median(decoder) if decoder else None,
            decoder_calls=len(decoder), total_ms=total)
        sampler = "one-step" if steps == 1 and guidance == 1.0 else "ddim"
        return Generated(prompt, seed, sampler, steps, guidance, pixels, latency)


# --- The PyTorch reference -----------------------------------------------------------------------

def reference_image(run_dir: str | Path, prompt: str, latent_size: int, seed: int, steps: int,
                    guidance: float, null_caption: str = "") -> np.ndarray:
    """The image (3, H, W) in [-1, 1] that PyTorch makes from the run directory with the same
    noise: its checkpoint's EMA UNet, the text encoder of its recipe, `ddim_sample` with its
    noise schedule and x0 clipping, and its autoencoder's `decode`."""
    import torch

    from ..data.autoencoder import make_autoencoder
    from ..train.diffusion import NoiseSchedule, ddim_sample
    from ..train.trainer import x0_clip
    from .bundle import pair_text_encoder, trial_recipe
    from .onnx import load_checkpoint

    spec, model = load_checkpoint(run_dir)
    recipe = trial_recipe(run_dir)
    if recipe is None:
        raise ExportError(f"{run_dir}: no recipe.yaml (in it or the sweep folder above), so "
                          f"the PyTorch reference cannot know its schedule and autoencoder")
    encoder = pair_text_encoder(spec, trial_dir=run_dir)
    autoencoder = make_autoencoder(recipe.autoencoder)
    schedule = NoiseSchedule(kind=recipe.noise_schedule, prediction=recipe.prediction)
    shape = (1, autoencoder.channels, latent_size, latent_size)
    latents = ddim_sample(model, schedule, encoder.encode([prompt]).tokens,
                          encoder.encode([null_caption]).tokens, shape, steps=steps,
                          guidance=guidance, generator=torch.Generator().manual_seed(seed),
                          clip_x0=x0_clip(autoencoder))
    return autoencoder.decode(latents)[0].float().numpy()


# --- Together ------------------------------------------------------------------------------------

def generate(bundle: str | Path | Bundle, prompt: str, out: str | Path | None = None,
             seed: int = 0, steps: int | None = None, guidance: float | None = None,
             check: str | Path | None = None, progress=None) -> Generated:
    """One image of `prompt` from a bundle (a folder, or a loaded `Bundle`), written as a PNG
    to `out` if given; with `check` (the run directory it was exported from), also made through
    PyTorch, and `max_abs_diff` set to the largest pixel difference."""
    say = progress or quiet
    if out is not None:
        image_path(out)  # refused before any work
    if not isinstance(bundle, Bundle):
        say(f"loading the bundle {bundle}")
        bundle = Bundle(bundle)
    result = bundle.generate(prompt, seed=seed, steps=steps, guidance=guidance)
    if out is not None:
        result.path = str(write_png(result.pixels, out))
    if check is not None:
        say(f"making the same image through PyTorch from {check}")
        reference = reference_image(check, prompt, bundle.manifest.latent_size, seed,
                                    result.steps, result.guidance,
                                    bundle.manifest.text_encoder.null_caption)
        result.max_abs_diff = compare(result.pixels, reference)[0]
        if not bundle.manifest.fp16:  # (half-precision graphs are not held to it)
            result.within_tolerance = result.max_abs_diff <= PIXEL_TOLERANCE
    return result


MAX_GRID_PROMPTS = 64


def read_prompts(path: str | Path) -> list[str]:
    """The captions of a prompts file: one per line; blank lines and lines starting with '#'
    are skipped. A missing, unreadable or empty file, or more than MAX_GRID_PROMPTS captions,
    is an ExportError naming the file (and the line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExportError(f"{path}: no such prompts file") from None
    except UnicodeDecodeError as err:
        raise ExportError(f"{path}: not UTF-8 text (byte {err.start}); a prompts file is one "
                          "caption per line") from None
    except OSError as err:
        raise ExportError(f"{path}: cannot read the prompts file ({err.strerror})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\x00" in line or not line.isprintable():
            raise ExportError(f"{path}: line {number}: not a caption (control characters)")
        prompts.append(line)
    if not prompts:
        raise ExportError(f"{path}: no prompts (one caption per line; '#' starts a comment)")
    if len(prompts) > MAX_GRID_PROMPTS:
        raise ExportError(f"{path}: {len(prompts)} prompts; a grid takes at most "
                          f"{MAX_GRID_PROMPTS}")
    return prompts


def generate_grid(bundle: str | Path | Bundle, prompts: list[str], out: str | Path,
                  seed: int = 0, steps: int | None = None, guidance: float | None = None,
                  columns: int = 4, progress=None) -> list[Generated]:
    """One image per prompt (each from noise `seed`), written as one PNG grid at `out` with each
    prompt above its image (nearest-neighbour upscaled, `mdsearch.train.grid.save_grid`)."""
    import torch

    from ..train.grid import save_grid

    say = progress or quiet
    image_path(out)  # refused before any work
    if not isinstance(bundle, Bundle):
        say(f"loading the bundle {bundle}")
        bundle = Bundle(bundle)
    results = []
    for n, prompt in enumerate(prompts, 1):
        results.append(bundle.generate(prompt, seed=seed, steps=steps, guidance=guidance))
        say(f"[{n}/{len(prompts)}] {prompt}")
    images = torch.from_numpy(np.stack([r.pixels for r in results])).float()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_grid(images, prompts, tmp, ncols=columns)
    for r in results:
        r.path = str(out)
    return results


def latency_table(results: list[Generated], names: list[str] | None = None) -> str:
    """A markdown table of the images' latencies, one row each, shaped as the paper's Table 4:
    text encoder, UNet per call and calls, decoder, and the whole image, in ms."""
    lines = ["| bundle | text encoder ms (calls) | UNet ms per call | UNet calls | decoder ms | "
             "overall ms per image |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(results):
        t = r.latency
        decoder = f"{t.decoder_ms:.1f}" if t.decoder_ms is not None else "- (pixel space)"
        name = names[i] if names else f"{r.sampler}, {r.describe()}"
        lines.append(f"| {name} | {t.text_encoder_ms:.1f} ({t.text_encoder_calls}) | "
                     f"{t.unet_ms:.1f} | {t.unet_calls} | {decoder} | {t.total_ms:.1f} |")
    return "\n".join(lines)
