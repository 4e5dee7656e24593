from mmpress.lmms.task_utils import doc_to_text, doc_to_visual, process_results  # noqa: F401
