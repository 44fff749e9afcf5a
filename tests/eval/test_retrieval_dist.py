"""2 gloo processes, each encoding half of the images (the eval loader's split: images r, r+2, ...),
gather the encodings, share the ITM scoring and get exactly the metrics of one process."""
import os

import torch
import torch.distributed as dist

from fastvl.eval.retrieval import encode, gather_encoded, group_images, retrieval_metrics

from ..two_ranks import spawn_two_ranks
from .test_retrieval import TableScorer, grouped_batches

IMAGES = 7


def _scorer_and_captions():
    g = torch.Generator().manual_seed(0)
    image_table, text_image = torch.randn(IMAGES, 6, generator=g), torch.arange(IMAGES).repeat_interleave(3)
    scorer = TableScorer(image_table, image_table[text_image] + 1.5 * torch.randn(3 * IMAGES, 6, generator=g),
                         text_image)
    return scorer, [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(IMAGES)]


def _metrics(scorer, batches):
    return retrieval_metrics(group_images(gather_encoded(encode(scorer, batches))), scorer, k_values=(1, 5, 10),
                             itm_rerank=3, batch_size=4)


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    scorer, captions_of = _scorer_and_captions()
    out.put((rank, _metrics(scorer, grouped_batches(captions_of, order=list(range(rank, IMAGES, 2))))))
    dist.destroy_process_group()


def test_two_ranks_score_as_one_process():
    scorer, captions_of = _scorer_and_captions()
    expected = _metrics(scorer, grouped_batches(captions_of))
    results = dict(spawn_two_ranks(_worker, 2))
    assert results[0] == expected and results[1] == expected
