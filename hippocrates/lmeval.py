"""lm-evaluation-harness's command line with the engine registered as its model `hippocrates`.

    python -m hippocrates.lmeval --model hippocrates --model_args pretrained=DIR[,adapter=DIR][,dtype=auto] \
        --tasks medqa_4options,pubmedqa [--batch_size 8] [--output_path out/] [any other lm-eval argument]

lm-eval 0.4 finds models only inside its own package, so this entry point imports the backend (which registers it)
and then hands the arguments to lm-eval's own CLI, which writes its usual output. lm-eval is an optional extra.
"""
import sys


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        sys.exit("error: lm-evaluation-harness is not installed: pip install 'hippocrates[lmeval]'")
    import hippocrates.eval.lmeval  # noqa: F401  registers the model "hippocrates"
    sys.argv[0] = "python -m hippocrates.lmeval"
    try:
        cli_evaluate()
    except (ValueError, FileNotFoundError) as err:  # a bad checkpoint, adapter, dtype or batch size: one line
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
