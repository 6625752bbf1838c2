//! The words of notices, per language: built in (`templates.toml`: English, Spanish), changed or
//! added by the operator (`[notify_templates.<language>]` in the config file). A person's
//! language is their own choice in the app, else the preferred language of their EHR record
//! (`Patient.communication`), else `COURIER_NOTIFY_LANGUAGE`.
//!
//! A template can only use the placeholders below, none of which can carry PHI: a notice says
//! which clinic, how many, and where to sign in — whatever an operator writes.

use std::collections::BTreeMap;

/// Language → key → text.
pub type Texts = BTreeMap<String, BTreeMap<String, String>>;

const BUILT_IN: &str = include_str!("templates.toml");
const PLACEHOLDERS: [&str; 4] = ["clinic", "count", "link", "code"];

fn built_in() -> &'static Texts {
    static T: std::sync::OnceLock<Texts> = std::sync::OnceLock::new();
    T.get_or_init(|| toml::from_str(BUILT_IN).expect("the built-in templates parse"))
}

/// The keys every language has (English's).
fn keys() -> impl Iterator<Item = &'static String> {
    built_in()["en"].keys()
}

/// Checks the operator's templates: known languages tags, known keys, known placeholders, and the
/// sign-in link in every SMS. `Err` names the first problem.
pub fn validate(extra: &Texts) -> Result<(), String> {
    for (lang, texts) in extra {
        if normalize(lang).as_deref() != Some(lang.as_str()) {
            return Err(format!(
                "notify_templates: '{lang}' is not a lower-case language tag such as 'fr' or 'pt'"
            ));
        }
        for (key, text) in texts {
            if !keys().any(|k| k == key) {
                return Err(format!(
                    "notify_templates.{lang}: unknown key '{key}' (known: {})",
                    keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            let mut rest = text.as_str();
            while let Some(open) = rest.find('{') {
                let Some(close) = rest[open..].find('}') else {
                    return Err(format!("notify_templates.{lang}.{key}: an unclosed '{{'"));
                };
                let name = &rest[open + 1..open + close];
                if !PLACEHOLDERS.contains(&name) {
                    return Err(format!(
                        "notify_templates.{lang}.{key}: unknown placeholder '{{{name}}}' (only {{clinic}}, {{count}}, {{link}}, {{code}})"
                    ));
                }
                rest = &rest[open + close + 1..];
            }
            if key.starts_with("sms") && !text.contains("{link}") {
                return Err(format!(
                    "notify_templates.{lang}.{key}: an SMS must carry the sign-in link ({{link}})"
                ));
            }
            if key == "code" && !text.contains("{code}") {
                return Err(format!("notify_templates.{lang}.code: must carry {{code}}"));
            }
        }
    }
    Ok(())
}

/// A language tag's primary subtag, lower-cased (`es-MX` → `es`), if it looks like one.
pub fn normalize(tag: &str) -> Option<String> {
    let primary = tag.trim().split(['-', '_']).next()?.to_ascii_lowercase();
    ((2..=3).contains(&primary.len()) && primary.chars().all(|c| c.is_ascii_lowercase()))
        .then_some(primary)
}

/// The languages notices can be written in: (tag, name), built in and the operator's.
pub fn languages(settings: &crate::config::Settings) -> Vec<(String, String)> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (lang, t) in built_in().iter().chain(settings.notify_templates.iter()) {
        let name = t
            .get("name")
            .cloned()
            .or_else(|| built_in().get(lang).and_then(|b| b.get("name").cloned()))
            .unwrap_or_else(|| lang.clone());
        out.insert(lang.clone(), name);
    }
    out.into_iter().collect()
}

/// The texts of one language, with what it lacks taken from English.
pub struct Words<'a> {
    settings: &'a crate::config::Settings,
    lang: String,
}

/// The words for `lang` (a person's language, if known), else the server's default language.
pub fn words<'a>(settings: &'a crate::config::Settings, lang: Option<&str>) -> Words<'a> {
    let known = |l: &str| settings.notify_templates.contains_key(l) || built_in().contains_key(l);
    let lang = lang
        .and_then(normalize)
        .filter(|l| known(l))
        .or_else(|| normalize(&settings.notify_language).filter(|l| known(l)))
        .unwrap_or_else(|| "en".into());
    Words { settings, lang }
}

impl Words<'_> {
    pub fn lang(&self) -> &str {
        &self.lang
    }

    /// The text of `key` with the placeholders filled in.
    pub fn get(&self, key: &str, count: i64, link: &str) -> String {
        let raw = self
            .settings
            .notify_templates
            .get(&self.lang)
            .and_then(|t| t.get(key))
            .or_else(|| built_in().get(&self.lang).and_then(|t| t.get(key)))
            .or_else(|| {
                self.settings
                    .notify_templates
                    .get("en")
                    .and_then(|t| t.get(key))
            })
            .or_else(|| built_in()["en"].get(key))
            .cloned()
            .unwrap_or_default();
        raw.replace("{clinic}", &self.settings.clinic_name)
            .replace("{count}", &count.to_string())
            .replace("{link}", link)
    }

    /// The one-time code message.
    pub fn code(&self, code: &str) -> String {
        self.get("code", 0, "").replace("{code}", code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_language_has_every_key_and_valid_placeholders() {
        for (lang, t) in built_in() {
            for k in keys() {
                assert!(t.contains_key(k), "{lang} lacks {k}");
            }
        }
        validate(built_in()).unwrap();
    }

    #[test]
    fn operator_templates_are_checked() {
        let t = |lang: &str, key: &str, text: &str| -> Texts {
            BTreeMap::from([(
                lang.to_string(),
                BTreeMap::from([(key.to_string(), text.to_string())]),
            )])
        };
        assert!(validate(&t("fr", "sms", "{clinic} : nouveau message. {link}")).is_ok());
        assert!(validate(&t("fr", "sms", "{clinic} : nouveau message."))
            .unwrap_err()
            .contains("{link}"));
        assert!(validate(&t("fr", "line", "De {sender}"))
            .unwrap_err()
            .contains("placeholder"));
        assert!(validate(&t("fr", "colour", "x"))
            .unwrap_err()
            .contains("unknown key"));
        assert!(validate(&t("French", "line", "x"))
            .unwrap_err()
            .contains("language tag"));
        assert_eq!(normalize("es-MX").as_deref(), Some("es"));
        assert_eq!(normalize("x"), None);
    }
}
