"""Check the code a user typed, from your app's backend: python3 check_code.py USER_ID CODE

The function is all an app needs (standard library only); the Flask handler below it
shows where it goes. VERIMAIL_GATEWAY (default http://127.0.0.1:8080) is the gateway,
VERIMAIL_API_KEY one of its GATEWAY_API_KEYS. Prints the gateway's JSON answer.
"""
import json
import os
import sys
import urllib.error
import urllib.request

GATEWAY = os.environ.get("VERIMAIL_GATEWAY", "http://127.0.0.1:8080")
API_KEY = os.environ.get("VERIMAIL_API_KEY", "")


def check_code(user_id, code, purpose="verify_email"):
    """(HTTP status, JSON answer) of POST /v1/codes/verify; 200 means confirmed."""
    body = json.dumps({"user_id": user_id, "purpose": purpose, "code": code}).encode()
    request = urllib.request.Request(
        f"{GATEWAY}/v1/codes/verify", data=body, method="POST",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as refused:  # 4xx/5xx still carry a JSON body
        return refused.code, json.load(refused)


# In a Flask app (ten lines):
#
# @app.post("/verify-email")
# @login_required
# def verify_email():
#     status, answer = check_code(current_user.id, request.form["code"].strip())
#     if status == 200:  # "verified" or "already_verified"
#         return redirect(url_for("welcome"))
#     if answer["status"] == "wrong_code":
#         flash(f"Wrong code, {answer['attempts_left']} tries left.")
#     else:  # locked, expired, used, no_code: a new mail brings a new code
#         publish_request(current_user)  # as examples/python/publish.py does
#         flash("That code no longer works: we sent you a new one.")
#     return redirect(url_for("verify_email_form"))

if __name__ == "__main__":
    status, answer = check_code(sys.argv[1], sys.argv[2])
    print(status, json.dumps(answer))
    sys.exit(0 if status == 200 else 1)
