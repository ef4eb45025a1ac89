"""The captioning application built on the model: what train.py and evaluate.py are made of.

data.py         captions on disk (RISC CSV / JSONL layout) -> examples, with bad rows named or skipped
training.py     the pieces of train.py's steps: batches, collate, schedule, what trains, the checks
run_folder.py   OUT: checkpoints that resume exactly, exports, the metrics log, W&B
precision.py    autocast and fp16 loss scaling, as one object the loop calls
validation.py   validation during training, and the best model it keeps (OUT/best)
results.py      evaluate.py's predictions, written as they are made and swapped in whole
distributed.py  torchrun: one process, DDP and FSDP2 behind one object (Parallel)
curves.py       loss.png
metrics.py      BLEU / METEOR / ROUGE-L / CIDEr-D with the COCO toolkit's conventions
meteor_java.py  METEOR 1.5 by pycocoevalcap's jar, one JVM per evaluation
bootstrap.py    95 % intervals over images and paired comparisons (resampled_cider.py: CIDEr-D's part)
wordnet.py      the WordNet database METEOR needs, built offline from Debian's files
synthetic.py    the embedded demo: procedural aerial scenes, and a tiny model to train on them
"""
