"""Write a synthetic corpus whose best achievable bits per character is known.

    python data/make_corpus.py data/demo.txt            # about 300 kB
    python data/make_corpus.py big.txt --chars 5000000 --seed 3

The text is a play of short speeches made of pseudo-words drawn from a
first-order Markov chain over *tokens*. Every token is a word followed by one
separator (a space, or ".\n" and the like), and no token contains whitespace
except at its end, so the text splits back into its tokens in exactly one
way: the text and the token sequence carry the same information. The entropy
rate of the text in bits per character is therefore

    H_token / E[token length],  H_token = sum_i pi_i H(P(. | i)),
    E[token length] = sum_i pi_i len(token_i),

with pi the chain's stationary distribution. No model can do better on long
held-out text, so a model's validation bits per character tells how close it
came. The figure is printed to stderr and written beside the corpus in
<corpus>.json.

Only numpy is needed; the output is the same for the same seed and size.
"""

import argparse
import json
import os
import sys

import numpy as np

SPEAKERS = ["ANNA", "BRAM", "CORA", "DUNCAN"]
SYLLABLES = ["ka", "lo", "mi", "ren", "sa", "tu", "vel", "do", "an", "el", "is",
             "or", "ba", "ne", "thi", "gra", "pe", "mo"]
ENDINGS = [".\n", "?\n", "!\n"]


def make_tokens(rng, n_words):
    """Distinct pseudo-words, each with a trailing space, then the sentence
    endings and the speaker lines, which all end in a newline."""
    words = set()
    while len(words) < n_words:
        n = rng.integers(1, 4)
        words.add("".join(rng.choice(SYLLABLES, n)))
    tokens = sorted(w + " " for w in words)
    tokens += ENDINGS
    tokens += [f"\n{name}:\n" for name in SPEAKERS]
    return tokens


def make_chain(rng, tokens, successors=6):
    """A sparse random transition matrix: each token has a few likely
    successors. After an ending comes a word or (sometimes) a new speaker;
    after a speaker line, a word."""
    n = len(tokens)
    words = [i for i, t in enumerate(tokens) if t.endswith(" ")]
    endings = [i for i, t in enumerate(tokens) if t in ENDINGS]
    speakers = [i for i, t in enumerate(tokens) if t.startswith("\n")]
    P = np.zeros((n, n))
    for i in range(n):
        if i in speakers or i in endings:
            choices = rng.choice(words, successors, replace=False)
            P[i, choices] = rng.dirichlet(np.ones(successors))
            if i in endings:
                P[i] *= 0.7
                P[i, speakers] = 0.3 / len(speakers)
        else:
            choices = rng.choice(words, successors, replace=False)
            P[i, choices] = rng.dirichlet(np.ones(successors)) * 0.85
            P[i, endings] = 0.15 / len(endings)
    return P


def stationary(P):
    """The stationary distribution: the left eigenvector for eigenvalue 1."""
    values, vectors = np.linalg.eig(P.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    return pi / pi.sum()


def entropy_rate_bits_per_char(P, tokens):
    pi = stationary(P)
    with np.errstate(divide="ignore", invalid="ignore"):
        row_entropy = -np.nansum(np.where(P > 0, P * np.log2(P), 0.0), axis=1)
    lengths = np.array([len(t) for t in tokens])
    return float(pi @ row_entropy / (pi @ lengths))


def generate(rng, P, tokens, n_chars):
    cumulative = np.cumsum(P, axis=1)
    state = len(tokens) - len(SPEAKERS)      # start with the first speaker
    pieces, total = [tokens[state].lstrip("\n")], 0
    draws = rng.random(n_chars)               # at least one draw per character
    for u in draws:
        state = min(int(np.searchsorted(cumulative[state], u * cumulative[state, -1])),
                    len(tokens) - 1)
        pieces.append(tokens[state])
        total += len(tokens[state])
        if total >= n_chars:
            break
    return "".join(pieces)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="where to write the corpus (UTF-8 text)")
    parser.add_argument("--chars", type=int, default=300_000, help="approximate length")
    parser.add_argument("--words", type=int, default=150, help="distinct pseudo-words")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.chars < 100 or args.words < 10:
        parser.error("--chars must be at least 100 and --words at least 10")
    rng = np.random.default_rng(args.seed)
    tokens = make_tokens(rng, args.words)
    P = make_chain(rng, tokens)
    text = generate(rng, P, tokens, args.chars)
    bits = entropy_rate_bits_per_char(P, tokens)
    try:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        with open(args.out + ".json", "w", encoding="utf-8") as f:
            json.dump({"chars": len(text), "seed": args.seed, "words": args.words,
                       "entropy_rate_bits_per_char": bits}, f, indent=1)
    except OSError as error:
        sys.exit(f"make_corpus.py: error: cannot write {args.out}: {error.strerror}")
    print(f"wrote {len(text):,} characters to {args.out}; best achievable: "
          f"{bits:.4f} bits per character", file=sys.stderr)


if __name__ == "__main__":
    main()
