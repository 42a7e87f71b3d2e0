"""The config tree's schema: one pydantic section per part of the pipeline, and :class:`Config`, which holds them.

Each field's default is the paper's hyperparameter (arXiv 2407.19544, see DESIGN.md) and its description gives
its unit or meaning. Sections forbid unknown keys, so a typo in a YAML file fails loudly; a checkpoint saved by
an earlier version still loads through :meth:`_Section.from_saved`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    # extra="forbid": a typo in a YAML key must fail loudly, not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def from_saved(cls, data: dict[str, Any]):
        """A section saved in a checkpoint by an earlier version: keys this version dropped are ignored.

        A user's trained model must keep loading after an upgrade; typos are a YAML problem, not a checkpoint's.
        """
        return cls.model_validate({k: v for k, v in data.items() if k in cls.model_fields})


class DataConfig(_Section):
    image_size: int = Field(512, ge=32, description="Training tile side in px (paper: 512x512).")
    resize_mode: Literal["resize", "tile"] = Field(
        "resize", description="How real images reach image_size: 'resize' the whole frame, or cut 'tile's."
    )
    scale: float = Field(
        1.0,
        gt=0,
        le=4,
        description="Tile mode: factor from original to working pixels (0.5 halves each side).",
    )
    target_particle_px: float | None = Field(
        None,
        gt=2,
        description="Tile mode: rescale the stack so its median particle diameter is this many px "
        "(scale estimated from the images by scale-space blob detection; overrides data.scale). None: use scale.",
    )
    magnification_tolerance: float | None = Field(
        1.5,
        gt=1,
        description="Tile mode with target_particle_px: a frame whose particles measure more than this factor "
        "larger or smaller than the stack's median frame's was taken at another magnification and gets its own "
        "working scale. None: one scale for the whole stack.",
    )
    real_crops: int = Field(
        64,
        ge=1,
        description="Crops of real frames drawn for GAN training (pix2pix pairs, CycleGAN domain B).",
    )
    positive_crops: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Share of pix2pix training crops drawn where the rough masks have particles.",
    )
    subset1_size: int = Field(
        5, ge=1, description="Images in subset 1, the rough-mask pix2pix set (paper: 5)."
    )
    test_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Held-out fraction (paper: train:test 4:1)."
    )
    min_images: int = Field(2, ge=1, description="Fewest usable images a stack may have.")
    seed: int = Field(0, description="Seed for splits, sampling and training.")
    norm_low_percentile: float = Field(0.5, ge=0, lt=50, description="Intensity mapped to 0 (robust min).")
    norm_high_percentile: float = Field(
        99.5, gt=50, le=100, description="Intensity mapped to 1 (robust max)."
    )
    pixel_size_nm: float | None = Field(
        None,
        gt=0,
        description="Pixel size in nm; overrides file metadata. None: use metadata, else report px.",
    )

    def normalize(self, image):
        """A raw frame as the networks see it: float32 in [0, 1] between this config's intensity percentiles."""
        from tgan_ray.io import normalize_intensity

        return normalize_intensity(image, self.norm_low_percentile, self.norm_high_percentile)


class StorageConfig(_Section):
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint (MinIO, Ceph, moto). None: AWS_ENDPOINT_URL or AWS's default."
    )
    s3_region: str | None = Field(None, description="S3 region. None: AWS_DEFAULT_REGION or us-east-1.")
    # Credentials are read only from the standard AWS environment / profile chain, never from config files,
    # so they are never saved with a run's config or logged to MLflow.


class RoughMaskConfig(_Section):
    method: Literal["classical", "model", "sam"] = Field(
        "classical", description="Step-2 segmenter: classical (training-free), model (NPsSegNet), sam."
    )
    particle_contrast: Literal["bright", "dark", "auto"] = Field(
        "auto", description="Particles brighter (HAADF) or darker (BF-TEM) than the support, or detect."
    )
    seed_model: str | None = Field(
        None, description="NPsSegNet checkpoint (path, s3:// or models:/) for 'model'."
    )
    sam_checkpoint: str | None = Field(None, description="Local Segment Anything weights for 'sam'.")
    min_particle_px: int = Field(12, ge=1, description="Smallest particle area kept, px (at working scale).")
    confidence: float = Field(
        0.5, ge=0, le=1, description="Precision knob: higher keeps only the most certain particles."
    )


class PriorConfig(_Section):
    n_masks: int = Field(1000, ge=1, description="Random masks sampled from the morphology prior (step 4).")
    max_empty_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Largest share of virtual masks with no particle. Sparse stacks leave most "
        "tiles empty; draws are skipped past this share so the segmenter sees particles (shapes stay faithful).",
    )
    border_policy: Literal["clip", "exclude"] = Field(
        "clip", description="Particles crossing the mask border: 'clip' them as real frames do, or 'exclude'."
    )


class GANConfig(_Section):
    """Settings shared by pix2pix and CycleGAN (paper: Adam 2e-4, betas 0.5/0.999, 100 + 50 epochs)."""

    epochs: int = Field(100, ge=0, description="Epochs at constant learning rate.")
    epochs_decay: int = Field(50, ge=0, description="Further epochs with linear decay of the lr to zero.")
    batch_size: int = Field(4, ge=1, description="Images per step per worker.")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="Cap on steps per epoch (None: one pass over the data)."
    )
    lr_g: float = Field(2e-4, gt=0, description="Generator learning rate.")
    lr_d: float = Field(2e-4, gt=0, description="Discriminator learning rate.")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1.")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    generator_encoder: str = Field("resnet34", description="smp encoder of the U-Net++ generator.")
    generator_encoder_weights: str | None = Field(
        None, description="None (offline default), 'imagenet' if it can load, or a local .pth file."
    )
    generator_decoder_channels: list[int] = Field(
        [256, 128, 64, 32, 16], description="U-Net++ decoder widths, deepest first (sets generator width)."
    )
    discriminator: Literal["patchgan", "unetplusplus"] = Field(
        "patchgan", description="70x70 PatchGAN (reference) or a per-pixel U-Net++ discriminator (paper)."
    )
    discriminator_layers: int = Field(3, ge=1, le=6, description="PatchGAN strided conv layers (3 = 70x70).")
    discriminator_width: int = Field(64, ge=4, description="PatchGAN first-layer filters.")
    gan_mode: Literal["lsgan", "vanilla"] = Field("lsgan", description="GAN loss (paper: least squares).")
    eval_every: int = Field(5, ge=1, description="Score generated images (FID/KID) every k epochs.")
    eval_images: int = Field(32, ge=2, description="Generated images scored at each evaluation.")


class Pix2PixConfig(GANConfig):
    lambda_l1: float = Field(10.0, ge=0, description="Weight of the L1 term (paper: 10).")
    noise_channels: int = Field(
        1,
        ge=0,
        description="Noise maps given to the generator beside the mask, so one mask can become many images "
        "(the reference pix2pix uses dropout; U-Net++ has none). 0: deterministic.",
    )
    unsure_input: bool = Field(
        False,
        description="Give the generator what step 2 is unsure of (found only at the classical segmenter's "
        "loosest setting) as a third input value, 0 between background -1 and particle 1. Then background in "
        "a mask means 'no particle', and masks drawn from the prior (only -1 and 1) get no painted extras.",
    )


class CycleGANConfig(GANConfig):
    lambda_cycle: float = Field(10.0, ge=0, description="Cycle-consistency weight (paper: 10).")
    lambda_identity: float = Field(0.5, ge=0, description="Identity weight, relative to lambda_cycle.")
    pool_size: int = Field(50, ge=0, description="History of generated images shown to the discriminators.")


class SegmenterConfig(_Section):
    arch: Literal["unetplusplus", "unet", "deeplabv3plus"] = Field(
        "unetplusplus", description="NPsSegNet is UNet++; unet / deeplabv3plus are baselines."
    )
    encoder: str = Field("resnet34", description="smp encoder (paper: ResNet34).")
    encoder_weights: str | None = Field(
        None, description="None (offline default), 'imagenet' if it can load, or a local .pth file."
    )
    decoder_channels: list[int] | None = Field(
        None,
        description="UNet/UNet++ decoder widths, deepest first; None: smp's default (256, 128, 64, 32, 16).",
    )
    epochs: int = Field(150, ge=1, description="Training epochs (paper: 150).")
    batch_size: int = Field(4, ge=1, description="Images per step per worker (paper: 4).")
    steps_per_epoch: int | None = Field(None, ge=1, description="Cap on steps per epoch (None: full pass).")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(5e-4, ge=0, description="AdamW weight decay.")
    lr_step: int = Field(5, ge=1, description="StepLR step, epochs.")
    lr_gamma: float = Field(0.9, gt=0, le=1, description="StepLR decay factor.")
    focal_alpha: float = Field(0.25, ge=0, le=1, description="Focal loss alpha.")
    augment: Literal["paper", "em"] = Field(
        "em",
        description="paper: Flip, ShiftScaleRotate, GaussNoise. em: also brightness/contrast/gamma, and the "
        "pixel noise the virtual images lack compared with the real stack (measured).",
    )
    min_drawn_contrast: float = Field(
        0.3,
        ge=0,
        description="A particle shows when its contrast to its surrounding support is at least this x the real "
        "particles' median contrast (step 2's masks). A virtual image that leaves a masked particle under it: the "
        "pair takes the other generation's image. A particle the segmenter marks under it on a real frame: not "
        "reported (support grains); with merge_rough the median is the frame's own rough particles' when it has "
        "at least 5. 0: no check.",
    )
    ignore_unmasked: bool = Field(
        True,
        description="Leave out of the loss the blobs a virtual image shows where its mask has no particle "
        "(the classical segmenter's loosest candidates; masks/consistency.py). The generators learned from "
        "rough masks that miss particles, so they paint some without a mask. False: such blobs are background.",
    )
    ignore_undrawn: bool = Field(
        False,
        description="Leave out of the loss the masked particles a chosen virtual image still does not show "
        "(contrast under min_drawn_contrast x the real particles'; masks/consistency.py). False: they stay "
        "particles, so the segmenter learns that some particles look like support. On in the cpu preset, whose "
        "real crops keep the loss supplied with particles where the generators draw few.",
    )
    merge_rough: bool = Field(
        True,
        description="`tgan segment` with a model and step 8 also run the rough segmenter (as `tgan segment "
        "--rough`) and add each particle it finds where NPsSegNet marks nothing: it is precision-first, and the "
        "two miss different particles. On a frame where NPsSegNet misses most of the rough particles the roles "
        "swap: the rough masks lead and NPsSegNet adds its particles that touch none of theirs (images.parquet's "
        '`lead`; docs/quality.md, "Merged with the rough particles"). Costs about one classical pass per frame; '
        "Serve returns NPsSegNet's masks alone. False: NPsSegNet's masks alone.",
    )
    merge_candidates: bool = Field(
        True,
        description="With merge_rough, also add each particle both segmenters call a candidate: a blob the rough "
        "segmenter finds at its loosest setting (confidence 0), touching none of the merged particles, where "
        "NPsSegNet's probability passes 0.2. Neither signal alone picks real particles out (most loose blobs are "
        "support); together they raised F1 on each of the four shared real stacks re-run with it (docs/"
        'quality.md, "Candidates both segmenters see"). Costs one more classical pass per frame at its radius.',
    )
    min_particle_fraction: float = Field(
        0.5,
        ge=0,
        description="Predicted objects smaller than this x the prior's 5th-percentile particle area are "
        "dropped (and holes that small filled). 0: keep every pixel the network marks.",
    )
    real_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of the training crops cut from the real stack, labelled by the rough segmenter's "
        "confident particles, with what it is unsure of left out of the loss (masks/pseudo.py). "
        "0: virtual pairs only (the paper).",
    )
    val_every: int = Field(1, ge=1, description="Validate every k epochs.")
    tile_overlap: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="Overlap of neighbouring inference tiles, as a fraction of the training tile (data.image_size).",
    )
    inference_tile: int = Field(
        512,
        ge=32,
        multiple_of=32,
        description="Largest inference tile side, px at the working scale (never below data.image_size): the "
        "network is fully convolutional, and larger tiles spend less work on overlaps. On CPU the cost per "
        "pixel rises above about 512 px (caches).",
    )
    inference_batch_size: int = Field(
        8, ge=1, description="Training tiles' worth of pixels per forward pass at inference."
    )
    inference_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto: bf16 on a GPU and on a CPU with native bf16 (AVX512-BF16, AMX), else fp32.",
    )


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray cluster address; None starts a local Ray instance.")
    # Not 0: Ray Train's in-process mode keeps no checkpoints, and every stage's result is its checkpoint.
    num_workers: int = Field(
        1, ge=1, description="Ray Train workers (DDP ranks): GPUs across nodes, or CPUs."
    )
    use_gpu: Literal["auto", "yes", "no"] = Field(
        "auto", description="GPU workers: auto uses them if present."
    )
    cpus_per_worker: float | None = Field(
        1.0,
        gt=0,
        description="CPUs per Train worker (fractions allowed; a CPU worker runs one torch thread per whole CPU). "
        "None: on a local Ray instance its CPUs shared among the workers (nothing else runs while a stage "
        "trains), on a cluster 1.",
    )
    gpus_per_worker: float = Field(1.0, ge=0, description="GPUs per Train worker when GPUs are used.")
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts from the last checkpoint (-1: ∞).")
    storage_path: str | None = Field(
        None, description="Where Ray Train keeps checkpoints (dir or s3://); None: <run>/ray."
    )
    num_to_keep: int = Field(2, ge=1, description="Checkpoints kept per stage (best by score).")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 CPU."
    )
    channels_last: bool = Field(True, description="channels_last memory format on GPU.")


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None: MLFLOW_TRACKING_URI, else sqlite in the run folder."
    )
    experiment: str = Field("tgan-ray", description="MLflow experiment name.")
    registered_model: str = Field("npssegnet", description="Registry name for the final segmenter.")
    enabled: bool = Field(True, description="Log to MLflow at all.")
    sample_every: int = Field(5, ge=1, description="Log sample grids every k epochs.")


class ScaleOutConfig(_Section):
    """Ray Data batch work: sharded generation (``tgan generate``) and segmentation (``tgan segment``)."""

    batch_size: int = Field(16, ge=1, description="Images per model call in an actor.")
    actors: int = Field(1, ge=1, description="Actors in the pool (one GPU each when GPUs are used).")
    cpus_per_actor: float | None = Field(
        None,
        gt=0,
        description="CPUs per actor (fractions allowed; torch gets one thread per CPU, rounded). None: on a "
        "local Ray instance the actors share all CPUs but what reading and writing need; 1 on a cluster.",
    )
    gpus_per_actor: float = Field(1.0, ge=0, description="GPUs per actor when GPUs are used.")
    masks_per_task: int = Field(64, ge=1, description="Random masks sampled per Ray Data block.")


class ServeConfig(_Section):
    """Ray Serve segmentation endpoint (``tgan serve``)."""

    host: str = Field("127.0.0.1", description="HTTP host to bind.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(4.0, gt=0, description="Autoscaling target per replica.")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica (0: CPU replicas).")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs per replica.")
    max_batch_size: int = Field(8, ge=1, description="Requests grouped into one forward pass (@serve.batch).")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a batch waits to fill.")
    max_ongoing_requests: int = Field(32, ge=1, description="Concurrent requests per replica.")
    max_upload_bytes: int = Field(256 * 2**20, ge=1024, description="Largest upload accepted (413 above).")
    max_pixels: int = Field(2**26, ge=1024, description="Largest decoded image, px (413 above: bomb guard).")
    max_queued_requests: int = Field(
        16,
        ge=-1,
        description="Requests waiting for a replica once every replica holds max_ongoing_requests; more are "
        "refused with 503 + Retry-After (-1: no bound, which lets an overloaded server queue for ever).",
    )
    retry_after_s: float = Field(
        2.0,
        ge=0,
        description="Retry-After (s, rounded up) sent with a 503 refusal or a 504 past the deadline.",
    )
    request_timeout_s: float = Field(
        90.0,
        gt=0,
        description="Deadline of one request in the replica (504 with a JSON detail after it); the HTTP proxy "
        "cuts the request (408) a little later, which also bounds time spent queued before a replica.",
    )

    @model_validator(mode="after")
    def _check_queue(self) -> ServeConfig:
        if self.max_queued_requests == 0:
            raise ValueError(
                "serve.max_queued_requests=0 would refuse every request: use -1 (no bound) or >= 1"
            )
        return self


class RunConfig(_Section):
    rounds: int = Field(1, ge=1, description="Adaptation rounds: repeat steps 2-8 with the new segmenter.")
    report_overlays: int = Field(4, ge=0, description="Real images shown with mask overlays in the report.")
    keep_checkpoints: bool = Field(
        False,
        description="Keep every Ray Train checkpoint (optimizer state included) once a stage is done; "
        "by default only each stage's best model stays (resume never retrains a finished stage).",
    )


class Config(_Section):
    data: DataConfig = DataConfig()
    storage: StorageConfig = StorageConfig()
    rough: RoughMaskConfig = RoughMaskConfig()
    prior: PriorConfig = PriorConfig()
    pix2pix: Pix2PixConfig = Pix2PixConfig()
    cyclegan: CycleGANConfig = CycleGANConfig()
    segmenter: SegmenterConfig = SegmenterConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    scale_out: ScaleOutConfig = ScaleOutConfig()
    serve: ServeConfig = ServeConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _check_tile_size(self) -> Config:
        # U-Net++ / PatchGAN downsample 32x: a tile side that does not divide by 32 breaks the skip connections.
        if self.data.image_size % 32:
            raise ValueError(f"data.image_size={self.data.image_size} must be a multiple of 32")
        return self
