"""WordNet for METEOR without a download: nltk's own data if present, else Debian's WordNet 3.0.

Debian's `wordnet-base` ships the database files in /usr/share/wordnet but not `lexnames`, which
nltk's reader needs; its 45 lines are printed in the lexnames(5WN) manual page and written here.
nltk >= 3.10 refuses symbolic links out of its data folder, so the files are copied.
"""
import shutil
from pathlib import Path

DEBIAN = Path("/usr/share/wordnet")
CACHE = Path.home() / ".cache" / "paligemma-from-scratch" / "nltk_data"
LEXNAMES = """adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body
noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive
noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation
noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication
verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception
verb.possession verb.social verb.stative verb.weather adj.ppl""".split()
SYNTACTIC_CATEGORY = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
INSTALL = ("METEOR needs WordNet and none was found. Either `apt-get install wordnet-base wordnet-sense-index` "
           "(Debian/Ubuntu; used offline from /usr/share/wordnet) or `python -m nltk.downloader wordnet` (online).")


def lexnames_text() -> str:
    return "".join(f"{i:02d}\t{name}\t{SYNTACTIC_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


def build_from_debian(data_root: Path = CACHE, source: Path = DEBIAN) -> Path:
    """Copy Debian's WordNet into `data_root/corpora/wordnet` (plus lexnames); returns data_root."""
    target = data_root / "corpora" / "wordnet"
    if (target / "lexnames").exists() and (target / "data.noun").exists():
        return data_root
    tmp = target.with_name("wordnet.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file():
            shutil.copyfile(f, tmp / f.name)
    (tmp / "lexnames").write_text(lexnames_text())
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return data_root


def available() -> bool:
    """Whether METEOR can run here: nltk's own WordNet data, or Debian's database to build it from."""
    from nltk.corpus import wordnet
    try:
        wordnet.ensure_loaded()
        return True
    except LookupError:
        return (DEBIAN / "data.noun").exists()


def ensure_wordnet():
    """Return nltk's wordnet reader, set up offline where needed; a clear error if impossible."""
    import nltk
    from nltk.corpus import wordnet
    try:
        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        pass
    if not (DEBIAN / "data.noun").exists():
        raise RuntimeError(INSTALL)
    root = str(build_from_debian())
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    wordnet.ensure_loaded()  # the lazy loader searches nltk.data.path again
    return wordnet
