"""`nodepass --completion bash`: the bash completion script, made from the
package's own tables (config.SERVER_PARAMS, tunnelset.OVERRIDES, ...) so that
it names every option and URL parameter this version takes, and no other.

It completes the options, the `status` command, a file after --config, the
schemes server:// and client://, and in a URL's query the parameter names
(after ? or &, those of the URL's own role) and the values of the ones that
take a word (log=, tls=, udp=, proxy=, log_format=). Install it with

    nodepass --completion bash > /etc/bash_completion.d/nodepass
    eval "$(nodepass --completion bash)"           # or: this shell only
"""

from typing import Dict, List

SHELLS = ("bash",)
OPTIONS = ("--check", "--config", "--metrics", "--help", "--version", "--completion", "--man")
SCHEMES = ("server://", "client://")
COMMANDS = ("status",)


def parameters(role: str) -> List[str]:
    """The query parameter names a URL of ``role`` takes, tunnel settings included."""
    from nodepass_gevent import tunnelset
    from nodepass_gevent.config import CLIENT_PARAMS, SERVER_PARAMS
    own = SERVER_PARAMS if role == "server" else CLIENT_PARAMS
    settings = [name for name in tunnelset.OVERRIDES
                if role == "client" or name not in tunnelset.CLIENT_ONLY]
    return list(own) + [name for name in settings if name not in own]


def parameter_values() -> Dict[str, List[str]]:
    """The parameters whose value is one of a few words, and those words."""
    from nodepass_gevent.config import LOG_FORMATS, LOG_LEVELS, PROXY_VERSIONS, UDP_MODES, WIRES
    return {"log": list(LOG_LEVELS), "tls": ["0", "1", "2"], "udp": list(UDP_MODES),
            "proxy": list(PROXY_VERSIONS), "log_format": list(LOG_FORMATS),
            "wire": list(WIRES)}


def bash_script(version: str) -> str:
    values = "\n".join("                %s=) candidates=(%s) ;;" % (name, " ".join(
        '"$query$name=%s"' % word for word in words)) for name, words in parameter_values().items())
    return _BASH.format(version=version, options=" ".join(OPTIONS), schemes=" ".join(SCHEMES),
                        commands=" ".join(COMMANDS),
                        server=" ".join(parameters("server")),
                        client=" ".join(parameters("client")), values=values)


_BASH = r'''# bash completion for nodepass (nodepass-gevent {version}),
# made by `nodepass --completion bash`.
_nodepass() {{
    local word="$2" line="${{COMP_LINE:0:COMP_POINT}}" token previous
    local -a words candidates
    # bash splits a URL at : = & (COMP_WORDBREAKS): complete the whole argument,
    # the text since the last blank, and hand bash back the part it calls a word.
    read -r -a words <<< "$line"
    if [[ -z "$line" || "$line" == *[[:space:]] ]]; then
        token="" previous="${{words[${{#words[@]}}-1]}}"
    else
        token="${{words[${{#words[@]}}-1]}}" previous="${{words[${{#words[@]}}-2]}}"
    fi
    token="${{token#[\"\']}}"
    case "$previous" in
        --config) COMPREPLY=($(compgen -f -- "$word")); return ;;
        --completion) COMPREPLY=($(compgen -W "bash" -- "$word")); return ;;
        --metrics) candidates=(127.0.0.1:9100) ;;
        status) candidates=(--metrics) ;;
    esac
    if [[ ${{#candidates[@]}} -gt 0 ]]; then
        :
    elif [[ "$token" == --config=* ]]; then
        COMPREPLY=($(compgen -f -- "${{token#--config=}}")); return
    elif [[ "$token" == -* ]]; then
        candidates=({options})
    elif [[ "$token" == *://*[?\&]* ]]; then
        local query="${{token%[?&]*}}" role="${{token%%://*}}" name
        query="${{token:0:${{#query}}+1}}"
        name="${{token:${{#query}}}}"
        if [[ "$name" == *=* ]]; then
            name="${{name%%=*}}"
            case "$name=" in
{values}
            esac
        else
            local -a names
            if [[ "$role" == server ]]; then names=({server}); else names=({client}); fi
            for name in "${{names[@]}}"; do candidates+=("$query$name="); done
        fi
    elif [[ "$token" != *://* ]]; then
        candidates=({schemes})
        [[ ${{#words[@]}} -le 1 || ( ${{#words[@]}} -eq 2 && -n "$token" ) ]] && \
            candidates+=({commands})
    fi
    # What bash's word leaves out of the token (the text before its last : = or &).
    local lead=$(( ${{#token}} - ${{#word}} )) candidate
    (( lead < 0 )) && lead=0
    COMPREPLY=()
    for candidate in "${{candidates[@]}}"; do
        [[ "$candidate" == "$token"* ]] && COMPREPLY+=("${{candidate:lead}}")
    done
    # A URL, a parameter or a value goes on: no space after it.
    [[ "$token" == *://* || "${{COMPREPLY[0]}}" == *[=/] ]] && compopt -o nospace 2>/dev/null
    return 0
}}
complete -F _nodepass nodepass
'''
