//! The `hashing` embedder: word unigrams, word bigrams and character trigrams of each word
//! (with boundary markers, "^cat$" → "^ca", "cat", "at$"), feature-hashed with a random sign
//! into a fixed-size vector and L2-normalised.
//!
//! Why these features: unigrams carry what a text is about, bigrams a little word order, and
//! the character trigrams let inflections and near spellings ("sits", "sitting"; "order_id",
//! "orderId") meet. The sign halves the bias that colliding features add to a dot product.
//! Text is lowercased and every ASCII digit reads as '0': ids, amounts and timestamps would
//! otherwise give each record features no other record shares, where what matters for
//! prefetch is the kind of content, not the exact numbers.
//!
//! Cost: no allocation per token (words are lowercased into a stack buffer), one xxh3 per
//! word and one multiply-xorshift mix per bigram and trigram.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{EmbedError, Embedder, normalize};
use crate::config::HASHING_DIMS;

/// Bytes of a word that count; the rest of a longer word (a hash, a base64 blob) adds nothing.
const MAX_WORD: usize = 48;

// Seeds keep the three feature kinds apart: the word "cat" and the trigram "cat" must not
// land on the same coordinate with the same sign.
const SEED_WORD: u64 = 0x9E37_79B9_7F4A_7C15;
const SEED_BIGRAM: u64 = 0xC2B2_AE3D_27D4_EB4F;
const SEED_TRIGRAM: u64 = 0x1656_67B1_9E37_79F9;

/// Weights of one word, its bigram with the word before it, and all its trigrams together
/// (each trigram gets WEIGHT_TRIGRAMS / sqrt(count), so long words do not drown short ones).
const WEIGHT_WORD: f32 = 1.0;
const WEIGHT_BIGRAM: f32 = 0.5;
const WEIGHT_TRIGRAMS: f32 = 1.0;

pub struct Hashing {
    dims: usize,
}

impl Hashing {
    pub fn new(dims: usize) -> Result<Self, EmbedError> {
        if !HASHING_DIMS.contains(&dims) {
            return Err(EmbedError::Config {
                key: "prefetch.hashing_dims",
                problem: format!("{dims} is out of range"),
                fix: "use a value from 32 to 4096 (default 256)".into(),
            });
        }
        Ok(Self { dims })
    }

    /// Embeds one text into `out` (which must have `dim()` entries) without allocating.
    pub fn embed_into(&self, text: &str, out: &mut [f32]) {
        assert_eq!(out.len(), self.dims, "output of the wrong dimension");
        out.fill(0.0);
        let mut features = Features {
            out,
            dims: self.dims as u64,
            previous_word: None,
        };
        // word[0] is the '^' marker; the word's bytes follow, then '$' when it is complete.
        let mut word = [0u8; MAX_WORD + 2];
        word[0] = b'^';
        let mut len = 0;
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            let in_word = if b.is_ascii() {
                i += 1;
                if b.is_ascii_digit() {
                    push(&mut word, &mut len, b'0');
                    true
                } else if b.is_ascii_alphabetic() {
                    push(&mut word, &mut len, b.to_ascii_lowercase());
                    true
                } else {
                    false
                }
            } else {
                // `i` is always on a character boundary: ASCII steps by one, the rest by the
                // character's length.
                let c = text[i..]
                    .chars()
                    .next()
                    .unwrap_or(char::REPLACEMENT_CHARACTER);
                i += c.len_utf8();
                if c.is_alphanumeric() {
                    let mut utf8 = [0u8; 4];
                    for lower in c.to_lowercase() {
                        for &x in lower.encode_utf8(&mut utf8).as_bytes() {
                            push(&mut word, &mut len, x);
                        }
                    }
                    true
                } else {
                    false
                }
            };
            if !in_word && len > 0 {
                word[len + 1] = b'$';
                features.word(&word[..len + 2]);
                len = 0;
            }
        }
        if len > 0 {
            word[len + 1] = b'$';
            features.word(&word[..len + 2]);
        }
        normalize(out);
    }
}

/// Appends a byte to the word being read; bytes past MAX_WORD are not kept.
#[inline]
fn push(word: &mut [u8; MAX_WORD + 2], len: &mut usize, b: u8) {
    if *len < MAX_WORD {
        word[1 + *len] = b;
        *len += 1;
    }
}

/// Accumulates hashed features of one text.
struct Features<'a> {
    out: &'a mut [f32],
    dims: u64,
    previous_word: Option<u64>,
}

impl Features<'_> {
    /// One word, with its markers: "^word$".
    fn word(&mut self, marked: &[u8]) {
        let core = &marked[1..marked.len() - 1];
        let h = xxh3_64_with_seed(core, SEED_WORD);
        self.add(h, WEIGHT_WORD);
        if let Some(p) = self.previous_word {
            // Rotating the first word's hash makes "a b" and "b a" different bigrams.
            self.add(mix(p.rotate_left(21) ^ h ^ SEED_BIGRAM), WEIGHT_BIGRAM);
        }
        self.previous_word = Some(h);
        let trigrams = marked.len() - 2;
        let w = WEIGHT_TRIGRAMS / (trigrams as f32).sqrt();
        for t in marked.windows(3) {
            let packed = u64::from(t[0]) | u64::from(t[1]) << 8 | u64::from(t[2]) << 16;
            self.add(mix(packed ^ SEED_TRIGRAM), w);
        }
    }

    /// Adds ±w at the coordinate of hash `h`: its high 32 bits pick the coordinate
    /// (multiply-shift, no modulo), its lowest bit the sign.
    #[inline]
    fn add(&mut self, h: u64, w: f32) {
        let index = (((h >> 32) * self.dims) >> 32) as usize;
        self.out[index] += if h & 1 == 0 { w } else { -w };
    }
}

/// splitmix64's finaliser: every input bit reaches every output bit.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Embedder for Hashing {
    fn name(&self) -> &'static str {
        "hashing"
    }

    fn dim(&self) -> usize {
        self.dims
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts
            .iter()
            .map(|t| {
                let mut v = vec![0.0; self.dims];
                self.embed_into(t, &mut v);
                v
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::super::cosine;
    use super::*;

    fn embed(h: &Hashing, text: &str) -> Vec<f32> {
        h.embed(&[text]).unwrap().remove(0)
    }

    fn norm(v: &[f32]) -> f32 {
        v.iter().map(|x| x * x).sum::<f32>().sqrt()
    }

    #[test]
    fn vectors_have_the_configured_dims_and_unit_norm() {
        for dims in [32, 256, 384, 4096] {
            let h = Hashing::new(dims).unwrap();
            let v = embed(
                &h,
                r#"{"type":"order_created","user":"u-1042","total":31.5}"#,
            );
            assert_eq!(v.len(), dims);
            assert!(
                (norm(&v) - 1.0).abs() < 1e-5,
                "dims {dims}: norm {}",
                norm(&v)
            );
        }
        assert!(Hashing::new(16).is_err());
        let e = Hashing::new(5000).err().unwrap().to_string();
        assert!(e.contains("prefetch.hashing_dims"), "{e}");
    }

    #[test]
    fn the_same_text_always_gives_the_same_vector() {
        let (a, b) = (Hashing::new(256).unwrap(), Hashing::new(256).unwrap());
        let text = "Payment declined: card expired (retry 3)";
        assert_eq!(embed(&a, text), embed(&b, text));
        let batch = a.embed(&[text, "other", text]).unwrap();
        assert_eq!(batch[0], batch[2]);
        assert_ne!(batch[0], batch[1]);
    }

    #[test]
    fn case_and_digits_do_not_matter_but_words_do() {
        let h = Hashing::new(256).unwrap();
        let a = embed(&h, "Order 1234 SHIPPED to Berlin");
        assert_eq!(a, embed(&h, "order 9876 shipped TO berlin"));
        assert!(cosine(&a, &embed(&h, "order 1234 cancelled in Paris")) < 0.9);
    }

    #[test]
    fn paraphrases_score_clearly_above_unrelated_sentences() {
        let h = Hashing::new(256).unwrap();
        let cat = embed(&h, "The cat sits on the mat");
        let para = cosine(&cat, &embed(&h, "A cat is sitting on a mat"));
        let unrelated = cosine(&cat, &embed(&h, "Stock markets fell sharply today"));
        println!("hashing cosine: paraphrase {para:.4}, unrelated {unrelated:.4}");
        assert!(
            para > 0.3 && unrelated < 0.15 && para > unrelated + 0.25,
            "paraphrase {para}, unrelated {unrelated}"
        );
        // Event-like records: same kind of event beats another kind.
        let ev = embed(&h, r#"{"type":"payment_failed","reason":"card_expired"}"#);
        let same = cosine(
            &ev,
            &embed(&h, r#"{"type":"payment_failed","reason":"card_declined"}"#),
        );
        let other = cosine(
            &ev,
            &embed(&h, r#"{"type":"user_signed_up","plan":"free"}"#),
        );
        println!("hashing cosine: same kind of event {same:.4}, other kind {other:.4}");
        assert!(same > other + 0.3, "same kind {same}, other kind {other}");
    }

    #[test]
    fn empty_and_wordless_texts_give_a_zero_vector() {
        let h = Hashing::new(64).unwrap();
        for text in ["", "   ", "{}[]:,\"\"", "— … 🙂"] {
            let v = embed(&h, text);
            assert_eq!(v.len(), 64);
            assert!(v.iter().all(|x| *x == 0.0), "{text:?}");
        }
    }

    #[test]
    fn non_ascii_words_are_lowercased_and_long_words_cut() {
        let h = Hashing::new(256).unwrap();
        assert_eq!(embed(&h, "ÄRGER Straße"), embed(&h, "ärger straße"));
        let v = embed(&h, "Ελληνικά κείμενα");
        assert!((norm(&v) - 1.0).abs() < 1e-5);
        // Only the first MAX_WORD bytes of a word count.
        let long = "x".repeat(MAX_WORD);
        assert_eq!(
            embed(&h, &format!("{long}aaaa")),
            embed(&h, &format!("{long}bbbb"))
        );
        assert_ne!(embed(&h, "xxxa"), embed(&h, "xxxb"));
    }
}
