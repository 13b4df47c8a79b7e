//! The shell-word lexer (variable expansion, quotes, escapes) with both
//! escape characters.
#![no_main]

use kiln_frontend::shell::{EnvList, Lex};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(word) = std::str::from_utf8(data) else { return };
    let env = EnvList::from_slice(&["A=1", "EMPTY=", "PATH=/usr/bin:/bin"]);
    for escape in ['\\', '`'] {
        let mut lex = Lex::new(escape);
        let _ = lex.process_word(word, &env);
        let _ = lex.process_words(word, &env);
        lex.raw_quotes = true;
        lex.raw_escapes = true;
        lex.skip_unset_env = true;
        let _ = lex.process_word_with_matches(word, &env);
    }
});
