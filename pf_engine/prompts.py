"""System prompts of the policies the method's authors ran (``SearchConfig.system_prompt``,
``pf-engine solve --prompt-preset``)."""

PROMPT_PRESETS = {
    # Qwen2.5-Math-Instruct's, which the paper's Qwen2.5-Math runs use
    "qwen2.5-math": "Please reason step by step, and put your final answer within \\boxed{}.",
}
