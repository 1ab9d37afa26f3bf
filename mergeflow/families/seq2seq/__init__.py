"""The seq2seq family: Flan-T5 and other Hugging Face seq2seq LMs as classifiers by scoring label words
(`scoring`), the model and its training (`model`), GLUE task data (`data`) and the family class (`family`)."""
