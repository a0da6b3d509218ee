"""The model runtime's GLM families: which model a checkpoint holds, its tokenizer, chat and tool formats."""
