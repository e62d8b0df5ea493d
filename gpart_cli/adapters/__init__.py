"""What gpart reads and writes (docs/design.md §1.6, §5): the one adapter reference (`reference`), base models from the
hub, a dir, a pip package or GGUF (`loading`), devices and precision, merged model dirs, the authors' adapter format
both ways (`authors_format`, `authors_convert`), run records and the Hub."""
