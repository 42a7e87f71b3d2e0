"""Steps 1-8 of the method as one resumable run (DESIGN.md).

    result = run_pipeline("stack/", "runs/r1", load_config("quick"))

Run folder::

    manifest.json         finished steps and their outputs (re-running the same command resumes)
    config.yaml  stack.json  mlflow.db
    work/<stem>.npy       frames normalised and rescaled to the working scale
    round1/rough/         step 2: rough masks of subset 1
    round1/prior.json     step 2->4: morphology prior (+ prior_ks.json: KS distances of the sampled masks)
    round1/gen1/          step 4 (Ray Data, generate_dataset): masks -> pix2pix: images/ (1st generation),
                          masks/, generate.json, manifest.parquet; CycleGAN's domain A
    round1/virtual/       steps 4-6 (Ray Data, generate_dataset): the virtual labelled dataset: masks/ (random
                          masks, written by step 4 first), gen1/ (1st generation), images/ (2nd generation),
                          generate.json, manifest.parquet (every pair), and manifest.json (the pairs the segmenter
                          trains on: images/ or gen1/, whichever is closer to the real images by KID)
    round1/npssegnet.pt   step 7: the label-free segmenter
    masks/<stem>.png      step 8 (Ray Data, segment_stack): masks of the real stack at original resolution (0/255)
    segment/              step 8: segment.json (model and settings), images.parquet (one row per image),
                          particles.parquet, summary.json (segment_stack's PSD of the stack)
    particles.csv  summary.json  plots/  report.html

``run_dir`` may be an ``s3://`` prefix: S3 then holds the folder above, and the steps work in a local copy of it
(``run_folder.py``), uploaded after every step; Ray workers write ray/, the generated sets, masks/ and segment/ to S3.

Random mask i of round r is ``sample_capped_mask_at(prior, data.image_size, data.seed + 1000 r, i,
prior.max_empty_fraction)``: the same file in round{r}/virtual/masks and round{r}/gen1/masks.
"""

from tgan_ray.pipeline.common import PipelineError, load_pngs
from tgan_ray.pipeline.run import Pipeline, PipelineResult, check_inputs, log_file, run_pipeline

__all__ = [
    "Pipeline",
    "PipelineError",
    "PipelineResult",
    "check_inputs",
    "load_pngs",
    "log_file",
    "run_pipeline",
]
