//! Run settings a boot loader leaves in `/chosen`, for a board with neither QEMU's fw_cfg nor a debugger's
//! semihosting: the string list [`SETTINGS`], each string `name=value` as on the semihosting command line. U-Boot
//! sets it with `fdt set /chosen smmuv3,settings "scenarios=probe,init" "exit=psci-off"`.

use core::fmt;

use fdt::Fdt;

/// The `/chosen` property that holds the settings.
pub const SETTINGS: &str = "smmuv3,settings";

/// Why [`settings`] refused the property.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingsError {
    /// The property is not a list of NUL-terminated strings (empty, or its last byte is not NUL).
    NotAStringList,
    /// String `index` (from 0) is not UTF-8.
    NotUtf8 {
        /// Which string.
        index: usize,
    },
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SettingsError::NotAStringList => write!(f, "/chosen/{SETTINGS} is not a list of strings"),
            SettingsError::NotUtf8 { index } => write!(f, "/chosen/{SETTINGS}: string {index} is not UTF-8"),
        }
    }
}

impl core::error::Error for SettingsError {}

/// The settings of a checked [`SETTINGS`] property: each `name=value` string as `(name, value)`, in order, the
/// strings without a `=` left out (as the semihosting command line's program name is).
#[derive(Clone, Debug)]
pub struct Settings<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Settings<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let end = self.rest.iter().position(|b| *b == 0)?;
            let (string, rest) = (&self.rest[..end], &self.rest[end + 1..]);
            self.rest = rest;
            // Checked UTF-8 by `settings`.
            if let Some(pair) = core::str::from_utf8(string).ok().and_then(|s| s.split_once('=')) {
                return Some(pair);
            }
        }
    }
}

/// The settings `/chosen` holds: `Ok(None)` without the property (or without `/chosen`), the whole list checked
/// before any setting is handed out.
///
/// # Errors
/// [`SettingsError::NotAStringList`] for a property that is empty or does not end in NUL,
/// [`SettingsError::NotUtf8`] for a string that is not UTF-8.
pub fn settings<'a>(fdt: &Fdt<'a>) -> Result<Option<Settings<'a>>, SettingsError> {
    let Some(property) = fdt.find_node("/chosen").and_then(|chosen| chosen.property(SETTINGS)) else {
        return Ok(None);
    };
    let value = property.value;
    if value.last() != Some(&0) {
        return Err(SettingsError::NotAStringList);
    }
    for (index, string) in value[..value.len() - 1].split(|b| *b == 0).enumerate() {
        if core::str::from_utf8(string).is_err() {
            return Err(SettingsError::NotUtf8 { index });
        }
    }
    Ok(Some(Settings { rest: value }))
}
