"""Foundations every stage uses, importing nothing else of the package: the user error and
its one-line exits (`errors`), typed config bounds (`bounds`), safe file writes and input
checks (`files`), weights-only checkpoint reads (`safeload`), Ctrl-C and SIGTERM
(`interrupt`), seeds (`seeding`), the registry of names (`registry`) and what the commands
set for the whole process at start-up (`startup`)."""
