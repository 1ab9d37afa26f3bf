"""The text family: a Hugging Face BERT-like encoder (`encoder`), its task data (`data`: bundled real datasets and
user parquet files) and the family class (`family`) under frozen linear-probe heads."""
