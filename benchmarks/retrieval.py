"""Retrieval metrics over 5,000 images x 25,000 captions, given the embeddings.

Times clipforge's ``retrieval_metrics`` (top-k of similarity chunks) against CLIP_benchmark's
``zeroshot_retrieval.evaluate`` from the point where it has the embeddings (the full score
matrix, the positive-pair matrix, ``batchify(recall_at_k, ...)`` for each k, its default batch
size 64), on the same embeddings in the same process, and checks that the metrics agree.

    PYTHONPATH=. python benchmarks/retrieval.py [--images 5000] [--captions-per-image 5] [--dim 512]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from clipforge.plugins.evaluators.retrieval import retrieval_metrics


def embeddings(n_images: int, per_image: int, dim: int, seed: int = 0):
    """Images, and captions that are noisy copies of their image (recall neither 0 nor 1)."""
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_images, dim, generator=g), dim=1)
    owner = torch.arange(n_images).repeat_interleave(per_image)
    texts = F.normalize(images[owner] + 6.0 * F.normalize(torch.randn(len(owner), dim, generator=g), dim=1), dim=1)
    return images, texts, owner


def clip_benchmark_metrics(images, texts, owner, ks, batch_size=64):
    """CLIP_benchmark's retrieval metrics from its embeddings on (its evaluate(), after the encoders)."""
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    scores = texts @ images.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), owner] = True
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = (
            (batchify(recall_at_k, scores, positive_pairs, batch_size, "cpu", k=k) > 0).float().mean().item()
        )
        metrics[f"text_retrieval_recall@{k}"] = (
            (batchify(recall_at_k, scores.T, positive_pairs.T, batch_size, "cpu", k=k) > 0).float().mean().item()
        )
    return metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    ks = [1, 5, 10]
    images, texts, owner = embeddings(args.images, args.captions_per_image, args.dim)
    print(f"{len(images):,} images x {len(texts):,} captions, dim {args.dim}, ks {ks}, torch threads {torch.get_num_threads()}")

    def best_of(fn):
        times, result = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
        return min(times), result

    ours_s, (ours, _) = best_of(lambda: retrieval_metrics(images, texts, owner, ks))
    theirs_s, theirs = best_of(lambda: clip_benchmark_metrics(images, texts, owner, ks))
    for name, value in theirs.items():
        assert abs(ours[name] - value) < 1e-6, (name, ours[name], value)
    print(f"clipforge retrieval_metrics:      {ours_s:6.2f} s (best of {args.repeats})")
    print(f"clip_benchmark retrieval (same):  {theirs_s:6.2f} s (best of {args.repeats})")
    print(f"speed-up: {theirs_s / ours_s:.1f}x; metrics equal to 1e-6: " + ", ".join(f"{k}={v:.4f}" for k, v in ours.items()))
    print("under 5 s" if ours_s < 5 else "NOT under 5 s")


if __name__ == "__main__":
    main()
