"""The CLIP family: open_clip and Hugging Face CLIP vision towers (`vision`), model directories (`model_dir`),
zero-shot heads (`zeroshot`, `templates`), image task data (`data`) and the family classes (`family`)."""
