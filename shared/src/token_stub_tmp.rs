use secrecy::SecretString;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFormat { V1, Itsdangerous }
impl std::str::FromStr for TokenFormat { type Err = String; fn from_str(s: &str) -> Result<Self, String> { match s { "v1" => Ok(Self::V1), "itsdangerous" => Ok(Self::Itsdangerous), _ => Err("x".into()) } } }
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digest { Sha1, Sha256 }
impl std::str::FromStr for Digest { type Err = String; fn from_str(s: &str) -> Result<Self, String> { match s { "sha1" => Ok(Self::Sha1), "sha256" => Ok(Self::Sha256), _ => Err("x".into()) } } }
#[derive(Debug)]
pub struct Keys;
impl Keys { pub fn new(_c: SecretString, _o: Vec<SecretString>, _s: String) -> Self { Keys } }
