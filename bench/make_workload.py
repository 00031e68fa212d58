#!/usr/bin/env python3
"""Generates the "rubric" workload: many candidates scored against one long
shared system prompt, as an OpenAI Batch API input file (JSONL)."""
import argparse
import json
import random

SKILLS = ["Rust", "Go", "C++", "Python", "Kafka", "PostgreSQL", "Kubernetes", "Terraform", "React", "Spark",
          "gRPC", "Redis", "AWS", "GCP", "Java", "Erlang", "CUDA", "Airflow", "Elixir", "Scala"]
CITIES = ["Lisbon", "Austin", "Berlin", "Toronto", "Nairobi", "Osaka", "Lima", "Krakow", "Dublin", "Pune"]
FIRST = ["Ada", "Grace", "Linus", "Ken", "Barbara", "Edsger", "Donald", "Margaret", "Alan", "Frances",
         "Dennis", "Radia", "Guido", "Shafi", "Leslie", "Tim", "Anita", "Jeff", "Sophie", "Niklaus"]


def rubric(target_words: int) -> str:
    rng = random.Random(7)
    parts = ["You are a hiring committee's scoring assistant for a Senior Backend Engineer role. "
             "Score each candidate from 0 to 100 against the rubric below and answer with the score "
             "and one short sentence of justification."]
    i = 0
    while sum(len(p.split()) for p in parts) < target_words:
        i += 1
        a, b = rng.sample(SKILLS, 2)
        parts.append(f"Criterion {i}: evidence of production experience with {a} and {b}; weigh ownership, "
                     f"incident response, design reviews and mentoring; subtract points for vague claims "
                     f"without measurable outcomes; prefer candidates who shipped systems at scale.")
    return "\n".join(parts)


def candidate(i: int, rng: random.Random) -> str:
    skills = ", ".join(rng.sample(SKILLS, 3))
    return (f"Candidate {FIRST[i % len(FIRST)]} {i}: {rng.randint(2, 20)} years of experience, "
            f"based in {rng.choice(CITIES)}, strongest in {skills}; last role at a "
            f"{rng.choice(['fintech', 'logistics', 'gaming', 'health', 'retail'])} company.")


# The scoring answer: {"score": 0-100, "verdict": hire/maybe/reject, "reason": short string}.
SCORE_SCHEMA = {
    "type": "object",
    "properties": {
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "verdict": {"type": "string", "enum": ["hire", "maybe", "reject"]},
        "reason": {"type": "string", "maxLength": 80},
    },
    "required": ["score", "verdict", "reason"],
    "additionalProperties": False,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rubric-words", type=int, default=1150, help="~1,900 tokens with the llama SPM vocab")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--completions", action="store_true", help="write /v1/completions lines instead of chat")
    ap.add_argument("--schema", action="store_true",
                    help="ask for structured output: response_format json_schema with SCORE_SCHEMA")
    args = ap.parse_args()
    rng = random.Random(42)
    system = rubric(args.rubric_words)
    with open(args.out, "w") as f:
        for i in range(args.requests):
            body = {"model": "kvbatch-demo", "max_tokens": args.max_tokens, "temperature": args.temperature,
                    "messages": [{"role": "system", "content": system},
                                 {"role": "user", "content": candidate(i, rng)}]}
            if args.schema:
                body["response_format"] = {"type": "json_schema",
                                           "json_schema": {"name": "score", "schema": SCORE_SCHEMA, "strict": True}}
            f.write(json.dumps({"custom_id": f"candidate-{i}", "method": "POST",
                                "url": "/v1/chat/completions", "body": body}) + "\n")


if __name__ == "__main__":
    main()
