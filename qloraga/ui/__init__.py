"""`qloraga ui`: one local page that drives the CLI and the library (new run with preview, live run with
stop and resume, runs compared, chat and export). `server` serves it, `page` lays it out, `form` derives the
settings form from the configuration classes, `jobs` starts and reads back `qloraga finetune` processes."""
